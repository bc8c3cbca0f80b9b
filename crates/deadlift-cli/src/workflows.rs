//! The CLI's workflow commands: `workflow` (apply, list, show, delete, run) and `event`
//! (publish), thin clients of the agent's `/v1/workflows` and `/v1/events` routes. What
//! happens to runs afterwards is in `runs.rs`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Remote, cell, path_segment, print_json, rows, table, time};
use crate::runs::print_run;

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Apply a workflow file (TOML, or JSON when it ends in .json): a new version
    Apply {
        /// The workflow file
        file: PathBuf,
        /// The workflow's name, when the file does not give one (default: the file stem)
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List workflows
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a workflow's current version (as TOML)
    Show {
        /// The workflow's name
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a workflow (its runs stay in the history)
    Delete {
        /// The workflow's name
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Start a run
    Run {
        /// The workflow's name
        name: String,
        /// The run's input, as JSON
        #[arg(long, default_value = "null")]
        input: String,
        /// Wait for the run to finish and print it
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// Publish one CloudEvent; answers once it is durable
    Publish {
        /// The event type (its routing subject), e.g. orders.created
        #[arg(value_name = "TYPE")]
        event_type: String,
        /// The event's data, as JSON
        #[arg(long, default_value = "null")]
        data: String,
        /// The event id (default: a new one); the same id twice has no second effect
        #[arg(long)]
        id: Option<String>,
        /// The event's source (CloudEvents `source`)
        #[arg(long, default_value = "deadlift-cli")]
        source: String,
        #[command(flatten)]
        remote: Remote,
    },
}

fn parse_json(text: &str, what: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text)
        .with_context(|| format!("{what} must be JSON (quote strings: '\"text\"')"))
}

pub async fn workflow(command: WorkflowCommand) -> anyhow::Result<()> {
    match command {
        WorkflowCommand::Apply { file, name, remote } => {
            let client = remote.client()?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let is_json = file.extension().is_some_and(|e| e == "json");
            let named: Option<String> = if is_json {
                parse_json(&text, "the workflow file")?["name"]
                    .as_str()
                    .map(str::to_owned)
            } else {
                let document: toml::Table = text
                    .parse()
                    .with_context(|| format!("{} is not valid TOML", file.display()))?;
                document
                    .get("name")
                    .and_then(|n| n.as_str())
                    .map(str::to_owned)
            };
            let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
            let Some(name) = named.or(name).or(stem) else {
                bail!("the workflow has no name: give `name = ...` in the file or --name");
            };
            let content_type = if is_json {
                "application/json"
            } else {
                "application/toml"
            };
            let applied = client
                .json(
                    client
                        .request(
                            Method::PUT,
                            &format!("/v1/workflows/{}", path_segment(&name)),
                        )
                        .header("content-type", content_type)
                        .body(text),
                )
                .await?;
            if remote.json {
                return print_json(&applied);
            }
            println!(
                "applied {} version {}",
                cell(&applied["name"]),
                cell(&applied["version"])
            );
        }
        WorkflowCommand::List { remote } => {
            let client = remote.client()?;
            let list = client
                .json(client.request(Method::GET, "/v1/workflows"))
                .await?;
            if remote.json {
                return print_json(&list);
            }
            let rows = rows(&list, |w| {
                let trigger = &w["spec"]["trigger"];
                let trigger = match (trigger["event"].as_str(), trigger["schedule"].as_str()) {
                    (Some(event), _) => format!("event {event}"),
                    (_, Some(schedule)) => format!("schedule {schedule}"),
                    _ => "http".into(),
                };
                vec![
                    cell(&w["name"]),
                    cell(&w["version"]),
                    trigger,
                    w["spec"]["steps"]
                        .as_array()
                        .map_or(0, Vec::len)
                        .to_string(),
                    time(&w["created_unix_ms"]),
                ]
            });
            table(&["name", "version", "trigger", "steps", "applied"], &rows);
        }
        WorkflowCommand::Show { name, remote } => {
            let client = remote.client()?;
            let found = client
                .json(client.request(
                    Method::GET,
                    &format!("/v1/workflows/{}", path_segment(&name)),
                ))
                .await?;
            if remote.json {
                return print_json(&found);
            }
            println!(
                "# {} version {}, applied {}",
                cell(&found["name"]),
                cell(&found["version"]),
                time(&found["created_unix_ms"])
            );
            print!(
                "{}",
                toml::to_string(&found["spec"]).context("cannot show the workflow as TOML")?
            );
        }
        WorkflowCommand::Delete { name, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(
                    Method::DELETE,
                    &format!("/v1/workflows/{}", path_segment(&name)),
                ))
                .await?;
            println!("deleted {name}");
        }
        WorkflowCommand::Run {
            name,
            input,
            wait,
            remote,
        } => {
            let client = remote.client()?;
            let input = parse_json(&input, "--input")?;
            let mut request = client
                .request(
                    Method::POST,
                    &format!("/v1/workflows/{}/runs", path_segment(&name)),
                )
                .json(&input);
            if wait {
                request = request.query(&[("wait", "true")]);
            }
            let answer = client.json(request).await?;
            if remote.json {
                print_json(&answer)?;
            } else if answer.get("steps").is_some() {
                print_run(&answer);
            } else {
                println!("run {} queued", cell(&answer["run_id"]));
            }
            // A waited run that did not succeed fails the command, for scripts.
            if wait && answer["status"] != "succeeded" {
                anyhow::bail!(
                    "run {} ended {}",
                    cell(&answer["id"]),
                    cell(&answer["status"])
                );
            }
        }
    }
    Ok(())
}

pub async fn event(command: EventCommand) -> anyhow::Result<()> {
    let EventCommand::Publish {
        event_type,
        data,
        id,
        source,
        remote,
    } = command;
    let client = remote.client()?;
    let event = json!({
        "specversion": "1.0",
        "id": id.unwrap_or_else(|| deadlift::workflow::event::new_id("evt_")),
        "source": source,
        "type": event_type,
        "datacontenttype": "application/json",
        "data": parse_json(&data, "--data")?,
    });
    let answer = client
        .json(
            client
                .request(Method::POST, "/v1/events")
                .header("content-type", "application/cloudevents+json")
                .body(event.to_string()),
        )
        .await?;
    if remote.json {
        return print_json(&answer);
    }
    for published in answer["events"].as_array().cloned().unwrap_or_default() {
        if published["duplicate"] == true {
            println!(
                "event {} was already received; nothing new happened",
                cell(&published["id"])
            );
            continue;
        }
        let runs: Vec<String> = published["runs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(cell)
            .collect();
        match runs.as_slice() {
            [] if published["clustered"] == true => println!(
                "published {}: stored by the cluster; the agent that takes it starts its runs",
                cell(&published["id"])
            ),
            [] => println!("published {} (no workflow matched)", cell(&published["id"])),
            runs => println!(
                "published {}; runs {}",
                cell(&published["id"]),
                runs.join(", ")
            ),
        }
    }
    Ok(())
}
