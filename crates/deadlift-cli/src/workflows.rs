//! The CLI's workflow commands: `workflow`, `event`, `runs` and `dlq`, each a thin
//! client of the agent's `/v1` workflow routes with readable output (or `--json`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{cell, rows, table};
use crate::{Remote, encode, print_json};

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Apply a workflow file (TOML, or JSON when it ends in .json): a new version
    Apply {
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
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a workflow (its runs stay in the history)
    Delete {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Start a run
    Run {
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
        #[arg(long, default_value = "deadlift-cli")]
        source: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first
    List {
        #[arg(long)]
        workflow: Option<String>,
        /// queued, running, succeeded, failed or cancelled
        #[arg(long)]
        status: Option<String>,
        /// Runs of this trace id
        #[arg(long)]
        trace: Option<String>,
        /// Runs of this event id
        #[arg(long)]
        event: Option<String>,
        /// Runs created at or after this time (RFC 3339)
        #[arg(long)]
        since: Option<String>,
        /// Runs created before this time (RFC 3339)
        #[arg(long)]
        until: Option<String>,
        /// Older than this position (the `next` of the previous page)
        #[arg(long)]
        before: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a run with every step, its logs and errors
    Show {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run a failed or cancelled run again from its failed step
    Retry {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a queued or running run
    Cancel {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Follow runs live as they start and finish
    Tail {
        #[arg(long)]
        workflow: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (failed runs waiting for attention)
    List {
        /// Include those already replayed
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Replay a dead letter: its run runs again from the failed step
    Replay {
        id: i64,
        #[command(flatten)]
        remote: Remote,
    },
}

fn parse_json(text: &str, what: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text)
        .with_context(|| format!("{what} must be JSON (quote strings: '\"text\"')"))
}

/// Unix milliseconds as an RFC 3339 time.
fn time(ms: &Value) -> String {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "-".into(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
}

fn rfc3339_ms(text: &str) -> anyhow::Result<i64> {
    Ok(chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("`{text}` is not an RFC 3339 time (e.g. 2026-11-22T10:00:00Z)"))?
        .timestamp_millis())
}

fn duration(run: &Value) -> String {
    match (
        run["started_unix_ms"].as_i64(),
        run["finished_unix_ms"].as_i64(),
    ) {
        (Some(start), Some(end)) => format!("{} ms", end - start),
        _ => "-".into(),
    }
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
                        .request(Method::PUT, &format!("/v1/workflows/{}", encode(&name)))
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
                .json(client.request(Method::GET, &format!("/v1/workflows/{}", encode(&name))))
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
                .send(client.request(Method::DELETE, &format!("/v1/workflows/{}", encode(&name))))
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
                    &format!("/v1/workflows/{}/runs", encode(&name)),
                )
                .json(&input);
            if wait {
                request = request.query(&[("wait", "true")]);
            }
            let answer = client.json(request).await?;
            if remote.json {
                return print_json(&answer);
            }
            if answer.get("steps").is_some() {
                print_run(&answer);
            } else {
                println!("run {} queued", cell(&answer["run_id"]));
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

fn run_rows(runs: &[Value]) -> Vec<Vec<String>> {
    runs.iter()
        .map(|r| {
            vec![
                cell(&r["id"]),
                format!("{}@{}", cell(&r["workflow"]), cell(&r["workflow_version"])),
                cell(&r["status"]),
                cell(&r["trigger"]),
                time(&r["created_unix_ms"]),
                duration(r),
                cell(&r["error"]["code"]),
            ]
        })
        .collect()
}

const RUN_COLUMNS: [&str; 7] = [
    "id", "workflow", "status", "trigger", "created", "took", "error",
];

fn print_run(run: &Value) {
    println!("run        {}", cell(&run["id"]));
    println!(
        "workflow   {} version {}",
        cell(&run["workflow"]),
        cell(&run["workflow_version"])
    );
    println!("status     {}", cell(&run["status"]));
    println!("trigger    {}", cell(&run["trigger"]));
    if let Some(event) = run["event"].as_object() {
        println!(
            "event      {} ({} from {})",
            cell(&event["id"]),
            cell(&event["type"]),
            cell(&event["source"])
        );
    }
    println!("trace id   {}", cell(&run["trace_id"]));
    println!("created    {}", time(&run["created_unix_ms"]));
    println!("started    {}", time(&run["started_unix_ms"]));
    println!(
        "finished   {} ({})",
        time(&run["finished_unix_ms"]),
        duration(run)
    );
    println!("input      {}", run["input"]);
    if !run["output"].is_null() || run["status"] == "succeeded" {
        println!("output     {}", run["output"]);
    }
    if run["error"].is_object() {
        println!(
            "error      {} in step {}: {}",
            cell(&run["error"]["code"]),
            cell(&run["error"]["step"]),
            cell(&run["error"]["message"])
        );
    }
    let steps = run["steps"].as_array().cloned().unwrap_or_default();
    println!("steps      {}", steps.len());
    for step in steps {
        let took = step["finished_unix_ms"].as_i64().unwrap_or(0)
            - step["started_unix_ms"].as_i64().unwrap_or(0);
        println!(
            "  - {} {} (attempts {}, {} ms){}",
            cell(&step["id"]),
            cell(&step["status"]),
            cell(&step["attempts"]),
            took,
            step["module"]
                .as_str()
                .map(|m| format!(" module {m}"))
                .unwrap_or_default()
        );
        println!("      input  {}", step["input"]);
        println!("      output {}", step["output"]);
        for failed in step["attempt_errors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            println!(
                "      retried after {}: {}",
                cell(&failed["code"]),
                cell(&failed["message"])
            );
        }
        if step["error"].is_object() {
            println!(
                "      error  {}: {}",
                cell(&step["error"]["code"]),
                cell(&step["error"]["message"])
            );
        }
        for line in step["logs"].as_array().cloned().unwrap_or_default() {
            println!(
                "      log {} {}",
                cell(&line["level"]),
                cell(&line["message"])
            );
        }
        for emitted in step["emitted"].as_array().cloned().unwrap_or_default() {
            println!("      emitted event {}", cell(&emitted));
        }
    }
}

pub async fn runs(command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::List {
            workflow,
            status,
            trace,
            event,
            since,
            until,
            before,
            limit,
            remote,
        } => {
            let client = remote.client()?;
            let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            query.extend(workflow.map(|w| ("workflow", w)));
            query.extend(status.map(|s| ("status", s)));
            query.extend(trace.map(|t| ("trace_id", t)));
            query.extend(event.map(|e| ("event_id", e)));
            query.extend(before.map(|b| ("before", b.to_string())));
            if let Some(since) = since {
                query.push(("since_unix_ms", rfc3339_ms(&since)?.to_string()));
            }
            if let Some(until) = until {
                query.push(("until_unix_ms", rfc3339_ms(&until)?.to_string()));
            }
            let page = client
                .json(client.request(Method::GET, "/v1/runs").query(&query))
                .await?;
            if remote.json {
                return print_json(&page);
            }
            let runs = page["runs"].as_array().cloned().unwrap_or_default();
            table(&RUN_COLUMNS, &run_rows(&runs));
            if let Some(next) = page["next"].as_i64() {
                println!("(more: --before {next})");
            }
        }
        RunsCommand::Show { id, remote } => {
            let client = remote.client()?;
            let run = client
                .json(client.request(Method::GET, &format!("/v1/runs/{}", encode(&id))))
                .await?;
            if remote.json {
                return print_json(&run);
            }
            print_run(&run);
        }
        RunsCommand::Retry { id, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(Method::POST, &format!("/v1/runs/{}/retry", encode(&id))))
                .await?;
            println!("run {id} queued again from its failed step");
        }
        RunsCommand::Cancel { id, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(Method::POST, &format!("/v1/runs/{}/cancel", encode(&id))))
                .await?;
            println!("run {id} cancelled");
        }
        RunsCommand::Tail { workflow, remote } => tail(remote, workflow).await?,
    }
    Ok(())
}

/// Follows `/v1/runs/live` (Server-Sent Events) and prints each run update.
async fn tail(remote: Remote, workflow: Option<String>) -> anyhow::Result<()> {
    let client = remote.client()?;
    let mut response = client
        .send(client.request(Method::GET, "/v1/runs/live"))
        .await?;
    if !remote.json {
        eprintln!("following runs (Ctrl-C to stop)");
    }
    let mut buffer = String::new();
    while let Some(chunk) = response.chunk().await.context("the stream broke")? {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let message: String = buffer.drain(..end + 2).collect();
            let mut kind = "message";
            let mut data = String::new();
            for line in message.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    kind = if value.trim() == "lagged" {
                        "lagged"
                    } else {
                        "run"
                    };
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if kind == "lagged" {
                eprintln!("(fell behind: {data} updates skipped)");
                continue;
            }
            let Ok(run) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            if workflow
                .as_ref()
                .is_some_and(|w| run["workflow"] != w.as_str())
            {
                continue;
            }
            if remote.json {
                println!("{run}");
            } else {
                println!(
                    "{}  {:<9}  {}@{}  {}{}",
                    time(
                        &run["finished_unix_ms"]
                            .as_i64()
                            .map_or(run["created_unix_ms"].clone(), Value::from)
                    ),
                    cell(&run["status"]),
                    cell(&run["workflow"]),
                    cell(&run["workflow_version"]),
                    cell(&run["id"]),
                    run["error"]["message"]
                        .as_str()
                        .map(|m| format!("  error: {m}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

pub async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { all, remote } => {
            let client = remote.client()?;
            let mut request = client.request(Method::GET, "/v1/dead-letters");
            if all {
                request = request.query(&[("include_replayed", "true")]);
            }
            let letters = client.json(request).await?;
            if remote.json {
                return print_json(&letters);
            }
            let rows = rows(&letters, |d| {
                vec![
                    cell(&d["id"]),
                    cell(&d["run_id"]),
                    cell(&d["workflow"]),
                    cell(&d["event_id"]),
                    cell(&d["error"]["code"]),
                    time(&d["created_unix_ms"]),
                    time(&d["replayed_unix_ms"]),
                ]
            });
            table(
                &[
                    "id", "run", "workflow", "event", "error", "failed", "replayed",
                ],
                &rows,
            );
        }
        DlqCommand::Replay { id, remote } => {
            let client = remote.client()?;
            let answer = client
                .json(client.request(Method::POST, &format!("/v1/dead-letters/{id}/replay")))
                .await?;
            if remote.json {
                return print_json(&answer);
            }
            println!(
                "dead letter {id} replayed: run {} queued again",
                cell(&answer["run_id"])
            );
        }
    }
    Ok(())
}
