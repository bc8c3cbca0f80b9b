//! The CLI's run commands: `runs` (list, show, retry, cancel, tail) and `dlq` (list,
//! replay), thin clients of the agent's `/v1/runs` and `/v1/dead-letters` routes.
//! `runs tail` follows the agent's Server-Sent Events stream `/v1/runs/live`.

use anyhow::Context;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{
    Remote, SseDecoder, cell, path_segment, print_json, report, rows, table, time,
};

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first
    List {
        /// Runs of this workflow
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
        /// At most this many runs
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a run with every step, its logs and errors
    Show {
        /// The run's id
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run a failed or cancelled run again from its failed step
    Retry {
        /// The run's id
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a queued or running run
    Cancel {
        /// The run's id
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Follow runs live as they start and finish
    Tail {
        /// Only runs of this workflow
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
        /// The dead letter's id, as `dlq list` shows it
        id: i64,
        #[command(flatten)]
        remote: Remote,
    },
}

pub(crate) fn rfc3339_ms(text: &str) -> anyhow::Result<i64> {
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

pub fn print_run(run: &Value) {
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
                .json(client.request(Method::GET, &format!("/v1/runs/{}", path_segment(&id))))
                .await?;
            if remote.json {
                return print_json(&run);
            }
            print_run(&run);
        }
        RunsCommand::Retry { id, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(
                    Method::POST,
                    &format!("/v1/runs/{}/retry", path_segment(&id)),
                ))
                .await?;
            report(
                &remote,
                json!({ "run": id, "queued": true }),
                format!("run {id} queued again from its failed step"),
            )?;
        }
        RunsCommand::Cancel { id, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(
                    Method::POST,
                    &format!("/v1/runs/{}/cancel", path_segment(&id)),
                ))
                .await?;
            report(
                &remote,
                json!({ "run": id, "cancelled": true }),
                format!("run {id} cancelled"),
            )?;
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
    let mut decoder = SseDecoder::default();
    while let Some(chunk) = response.chunk().await.context("the stream broke")? {
        for message in decoder.push(&chunk) {
            if message.event.as_deref() == Some("lagged") {
                eprintln!("(fell behind: {} updates skipped)", message.data);
                continue;
            }
            let Ok(run) = serde_json::from_str::<Value>(&message.data) else {
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
