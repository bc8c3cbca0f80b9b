//! Workflows from the command line, and crash recovery with a real process: an agent
//! killed with SIGKILL mid-stream loses no accepted event and doubles none.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{BIN, Server, fixture};

const PIPELINE: &str = r#"
name = "load"
description = "Adds ten, then multiplies by five"
trigger = { event = "load.>" }

[[steps]]
id = "add"
call = "adder"

[[steps]]
id = "times"
call = "times-five"
"#;

fn setup(server: &Server, admin: &str, dir: &std::path::Path) {
    let tenant = ["--tenant", "default"];
    for (name, module) in [("adder", "add_ten"), ("times-five", "multiply_by_five")] {
        let mut args = vec!["module", "push"];
        let path = fixture(module);
        args.extend([path.as_str(), "--name", name]);
        args.extend(tenant);
        server.ok(Some(admin), &args);
    }
    let file = dir.join("load.toml");
    std::fs::write(&file, PIPELINE).unwrap();
    let applied = server.ok(
        Some(admin),
        &[
            "workflow",
            "apply",
            file.to_str().unwrap(),
            "--tenant",
            "default",
        ],
    );
    assert!(applied.contains("applied load version 1"), "{applied}");
}

#[test]
fn a_user_drives_workflows_events_runs_and_dead_letters_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server.admin_token.clone().unwrap();
    setup(&server, &admin, dir.path());
    let t = ["--tenant", "default"];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(t.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    let ok = |args: &[&str]| {
        let args = with(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        server.ok(Some(&admin), &args)
    };

    let listed = ok(&["workflow", "list"]);
    assert!(
        listed.contains("load") && listed.contains("event load.>"),
        "{listed}"
    );
    let shown = ok(&["workflow", "show", "load"]);
    assert!(
        shown.contains("[[steps]]") && shown.contains("times-five"),
        "{shown}"
    );

    // Follow runs live while an event arrives.
    let mut tail = Command::new(BIN)
        .args(with(&["runs", "tail", "--json"]))
        .env("DEADLIFT_SERVER", &server.url)
        .env("DEADLIFT_TOKEN", &admin)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tail_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let collected = tail_lines.clone();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            collected.lock().unwrap().push(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    let published = ok(&[
        "event", "publish", "load.cli", "--data", "1", "--id", "cli-1",
    ]);
    assert!(
        published.contains("published cli-1; runs run_"),
        "{published}"
    );
    let again = ok(&[
        "event", "publish", "load.cli", "--data", "1", "--id", "cli-1",
    ]);
    assert!(again.contains("already received"), "{again}");

    let mut runs = String::new();
    for _ in 0..100 {
        runs = ok(&["runs", "list", "--event", "cli-1", "--status", "succeeded"]);
        if runs.lines().count() > 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let run_id = runs
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let shown = ok(&["runs", "show", &run_id]);
    for expected in [
        "status     succeeded",
        "output     55",
        "- add succeeded",
        "- times succeeded",
        "trace id",
        "event      cli-1",
    ] {
        assert!(shown.contains(expected), "{expected} not in\n{shown}");
    }
    for _ in 0..100 {
        if tail_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(&run_id) && l.contains("succeeded"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(
        tail_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(&run_id) && l.contains("succeeded")),
        "runs tail showed the run finishing"
    );

    // A run with a bad input fails, is dead-lettered, and replays after a fix.
    // Issue 14: a waited run that failed exited 0. It prints the run and exits 1.
    let waited = server.cli(
        Some(&admin),
        &with(&["workflow", "run", "load", "--input", "\"x\"", "--wait"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!waited.status.success());
    let printed = String::from_utf8_lossy(&waited.stdout);
    assert!(
        printed.contains("status     failed") && printed.contains("guest_error"),
        "{printed}"
    );
    assert!(String::from_utf8_lossy(&waited.stderr).contains("ended failed"));
    let letters: Value = serde_json::from_str(&ok(&["dlq", "list", "--json"])).unwrap();
    let letter = letters[0]["id"].to_string();
    let failed_run = letters[0]["run_id"].as_str().unwrap().to_owned();
    let replayed = ok(&["dlq", "replay", &letter]);
    assert!(replayed.contains(&failed_run), "{replayed}");
    let retry_ok = server.cli(Some(&admin), &{
        let mut a = vec!["runs", "retry", "nope"];
        a.extend(t);
        a
    });
    assert!(!retry_ok.status.success());
    assert!(String::from_utf8_lossy(&retry_ok.stderr).contains("(run_not_found)"));

    // Invalid workflow files are refused with the field named.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[steps]]\nid = \"x\"\ncall = \"missing\"\n").unwrap();
    let refused = server.cli(Some(&admin), &{
        let mut a = vec!["workflow", "apply", bad.to_str().unwrap()];
        a.extend(t);
        a
    });
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("steps[0].call") && stderr.contains("(workflow_invalid)"),
        "{stderr}"
    );
}

/// Sends events one request each from `clients` threads until the agent stops
/// answering; returns the ids that were acknowledged with 202.
async fn feed(
    url: String,
    token: String,
    accepted: Arc<Mutex<BTreeSet<u64>>>,
    first: u64,
    step: u64,
) {
    let http = reqwest::Client::new();
    let mut n = first;
    loop {
        let event = json!({
            "specversion": "1.0", "id": format!("crash-{n}"), "source": "/crash-test",
            "type": "load.crash", "data": n,
        });
        let answer = http
            .post(format!("{url}/v1/events"))
            .bearer_auth(&token)
            .header("x-deadlift-tenant", "default")
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match answer {
            Ok(response) if response.status().as_u16() == 202 => {
                accepted.lock().unwrap().insert(n);
            }
            Ok(response) => panic!("unexpected answer {}", response.status()),
            Err(_) => return, // the agent is gone
        }
        n += step;
    }
}

#[test]
fn a_killed_agent_loses_no_accepted_event_and_runs_each_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // One run at a time: events arrive faster than they run, so the kill leaves many
    // runs queued or half done.
    let server = Server::start_with(dir.path(), &[("DEADLIFT_MAX_CONCURRENT_RUNS", "1")]);
    let admin = server.admin_token.clone().unwrap();
    setup(&server, &admin, dir.path());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    const CLIENTS: u64 = 8;
    let feeders: Vec<_> = (0..CLIENTS)
        .map(|i| {
            runtime.spawn(feed(
                server.url.clone(),
                admin.clone(),
                accepted.clone(),
                i,
                CLIENTS,
            ))
        })
        .collect();
    // Let the stream run, then kill the agent in the middle of it.
    while accepted.lock().unwrap().len() < 600 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut server = server;
    server.child.kill().unwrap(); // SIGKILL: no shutdown of any kind
    server.child.wait().unwrap();
    runtime.block_on(async {
        for feeder in feeders {
            feeder.await.unwrap();
        }
    });
    let accepted: Vec<u64> = accepted.lock().unwrap().iter().copied().collect();
    drop(server);

    let again = Server::start(dir.path());
    assert!(
        again.resumed > 0,
        "the kill left runs open, and the restart resumed them"
    );
    eprintln!(
        "{} events accepted, {} runs resumed",
        accepted.len(),
        again.resumed
    );
    let http = reqwest::Client::new();
    runtime.block_on(async {
        // Every accepted event ends with exactly one succeeded run of `load`.
        let mut pending: BTreeSet<u64> = accepted.iter().copied().collect();
        for _ in 0..400 {
            let mut still = BTreeSet::new();
            for &n in &pending {
                let page: Value = http
                    .get(format!("{}/v1/runs", again.url))
                    .query(&[("event_id", format!("crash-{n}"))])
                    .bearer_auth(&admin)
                    .header("x-deadlift-tenant", "default")
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let runs = page["runs"].as_array().unwrap();
                assert!(runs.len() <= 1, "event crash-{n} has {} runs", runs.len());
                match runs.first() {
                    Some(run) if run["status"] == "succeeded" => {}
                    Some(run) if run["status"] == "failed" => panic!("crash-{n} failed: {run}"),
                    _ => {
                        still.insert(n);
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            pending.is_empty(),
            "accepted events without a succeeded run: {pending:?}"
        );
        // And each run computed the right thing: (n + 10) * 5.
        for &n in accepted.iter().step_by(37) {
            let page: Value = http
                .get(format!("{}/v1/runs", again.url))
                .query(&[("event_id", format!("crash-{n}"))])
                .bearer_auth(&admin)
                .header("x-deadlift-tenant", "default")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = page["runs"][0]["id"].as_str().unwrap();
            let run: Value = http
                .get(format!("{}/v1/runs/{id}", again.url))
                .bearer_auth(&admin)
                .header("x-deadlift-tenant", "default")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(run["output"], json!((n + 10) * 5), "{run}");
        }
    });
    assert!(accepted.len() >= 600);
}
