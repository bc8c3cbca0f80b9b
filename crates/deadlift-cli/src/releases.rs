//! `deadlift module rollout | promote | rollback | release`: which version serves a
//! module name, and rolling another out as a canary or in shadow.

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Remote, cell, path_segment, print_json, time};

#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    /// The candidate: NAME@VERSION (or NAME and --version)
    module: String,
    /// The candidate's version, when MODULE is a bare name
    #[arg(long)]
    version: Option<String>,
    /// Percent of calls the candidate serves (default 5)
    #[arg(long, value_name = "PERCENT", conflicts_with = "shadow")]
    canary: Option<f64>,
    /// Serve nothing: replay live calls through the candidate, answered from their
    /// tapes, and compare
    #[arg(long)]
    shadow: bool,
    /// In shadow, the percent of live calls compared (default 100)
    #[arg(long, value_name = "PERCENT", requires = "shadow")]
    share: Option<f64>,
    /// Seconds over which error rates are compared (default 300)
    #[arg(long, value_name = "SECONDS")]
    window: Option<u64>,
    /// Calls the candidate must serve in the window before it is judged (default 20)
    #[arg(long)]
    min_calls: Option<u64>,
    /// Percentage points of errors the candidate may have over the live version before
    /// it is rolled back (default 5)
    #[arg(long, value_name = "POINTS")]
    max_error_increase: Option<f64>,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// NAME to promote its rollout's candidate, or NAME@VERSION to make that version live
    module: String,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// The module name
    name: String,
    #[command(flatten)]
    remote: Remote,
}

/// `name@version` split; a bare name has no version.
fn split(module: &str) -> (&str, Option<&str>) {
    match module.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (module, None),
    }
}

pub async fn rollout(args: RolloutArgs) -> anyhow::Result<()> {
    let (name, version) = split(&args.module);
    let version = version
        .map(str::to_owned)
        .or(args.version)
        .ok_or_else(|| anyhow::anyhow!("name the candidate as NAME@VERSION"))?;
    let mut spec = json!({
        "candidate": version,
        "mode": if args.shadow { "shadow" } else { "canary" },
    });
    if let Some(percent) = args.canary.or(args.share) {
        spec["percent"] = json!(percent);
    }
    if let Some(window) = args.window {
        spec["window_s"] = json!(window);
    }
    if let Some(calls) = args.min_calls {
        spec["min_calls"] = json!(calls);
    }
    if let Some(points) = args.max_error_increase {
        spec["max_error_increase"] = json!(points);
    }
    let client = args.remote.client()?;
    let path = format!("/v1/modules/{}/rollout", path_segment(name));
    let status = client
        .json(client.request(Method::POST, &path).json(&spec))
        .await?;
    show(&args.remote, name, &status)
}

pub async fn promote(args: PromoteArgs) -> anyhow::Result<()> {
    let (name, version) = split(&args.module);
    let client = args.remote.client()?;
    let path = format!("/v1/modules/{}/promote", path_segment(name));
    let body = match version {
        Some(version) => json!({ "version": version }),
        None => json!({}),
    };
    let status = client
        .json(client.request(Method::POST, &path).json(&body))
        .await?;
    show(&args.remote, name, &status)
}

pub async fn rollback(args: NameArgs) -> anyhow::Result<()> {
    let client = args.remote.client()?;
    let path = format!("/v1/modules/{}/rollback", path_segment(&args.name));
    let status = client.json(client.request(Method::POST, &path)).await?;
    show(&args.remote, &args.name, &status)
}

pub async fn release(args: NameArgs) -> anyhow::Result<()> {
    let client = args.remote.client()?;
    let path = format!("/v1/modules/{}/release", path_segment(&args.name));
    let status = client.json(client.request(Method::GET, &path)).await?;
    show(&args.remote, &args.name, &status)
}

fn label(name: &str, version: &Value) -> String {
    match version["version"].as_str() {
        Some(v) => format!("{name}@{v}"),
        None => cell(&version["module"]),
    }
}

/// A release as text: the live version, the rollout and its counts, the history.
fn show(remote: &Remote, name: &str, status: &Value) -> anyhow::Result<()> {
    if remote.json {
        return print_json(status);
    }
    println!("{name}: live {}", label(name, &status["live"]));
    let rollout = &status["rollout"];
    if rollout.is_object() {
        let percent = rollout["percent"].as_f64().unwrap_or_default();
        let candidate = label(name, &rollout["candidate"]);
        if rollout["mode"] == "shadow" {
            println!("rollout: {candidate} in shadow of {percent}% of calls");
        } else {
            println!(
                "rollout: {candidate} as a canary on {percent}% of calls (judged over {} s after {} calls; rolled back past {} points more errors)",
                cell(&rollout["window_s"]),
                cell(&rollout["min_calls"]),
                rollout["max_error_increase"].as_f64().unwrap_or_default(),
            );
        }
        let window = &status["window"];
        if window.is_object() {
            println!(
                "  live: {} calls, {} errors · candidate: {} calls, {} errors",
                cell(&window["live_calls"]),
                cell(&window["live_errors"]),
                cell(&window["candidate_calls"]),
                cell(&window["candidate_errors"]),
            );
        }
        let shadow = &status["shadow"];
        if shadow.is_object() {
            println!(
                "  compared {}: {} identical, {} changed, {} newly failing, {} no longer failing, {} still failing, {} diverged; {} skipped",
                cell(&shadow["compared"]),
                cell(&shadow["identical"]),
                cell(&shadow["changed"]),
                cell(&shadow["newly_failing"]),
                cell(&shadow["no_longer_failing"]),
                cell(&shadow["still_failing"]),
                cell(&shadow["diverged"]),
                cell(&shadow["skipped"]),
            );
        }
    } else {
        println!("rollout: none");
    }
    for entry in status["history"].as_array().into_iter().flatten() {
        let detail = entry["detail"]
            .as_str()
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        println!(
            "  {} {} {}{detail}",
            time(&entry["at_unix_ms"]),
            cell(&entry["action"]),
            label(name, entry),
        );
    }
    Ok(())
}
