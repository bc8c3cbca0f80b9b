//! The `deadlift` binary as a user runs it: a real `serve` process on a loopback port,
//! driven by the CLI's own client commands.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

mod cluster;
mod console;
mod federation;
mod readme;
mod workflows;

const BIN: &str = env!("CARGO_BIN_EXE_deadlift");

fn fixture(name: &str) -> String {
    format!(
        "{}/../../guests/wasm/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A `deadlift serve` process; killed when dropped.
struct Server {
    child: Child,
    url: String,
    admin_token: Option<String>,
    /// Runs the server said it resumed at start.
    resumed: usize,
}

impl Server {
    fn start(data_dir: &std::path::Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    fn start_with(data_dir: &std::path::Path, env: &[(&str, &str)]) -> Self {
        Self::start_on(data_dir, "127.0.0.1:0", env)
    }

    fn start_on(data_dir: &std::path::Path, listen: &str, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .env_remove("DEADLIFT_ADMIN_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut url = None;
        let mut admin_token = None;
        let mut resumed = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("resumed ") {
                resumed = rest.split(' ').next().unwrap().parse().unwrap();
            }
            if let Some(token) = line.strip_prefix("admin token (shown once, keep it safe): ") {
                admin_token = Some(token.to_owned());
            } else if let Some(rest) = line.strip_prefix("deadlift agent listening on ") {
                url = Some(rest.to_owned());
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            url: url.expect("the server prints where it listens"),
            admin_token,
            resumed,
        }
    }

    fn cli(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("DEADLIFT_SERVER", &self.url)
            .env_remove("DEADLIFT_TOKEN");
        if let Some(token) = token {
            command.env("DEADLIFT_TOKEN", token);
        }
        command.output().unwrap()
    }

    fn ok(&self, token: Option<&str>, args: &[&str]) -> String {
        let out = self.cli(token, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// SIGTERM, then wait: the server must stop by itself, cleanly.
    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_and_drive_it_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server
        .admin_token
        .clone()
        .expect("first start prints an admin token");

    server.ok(Some(&admin), &["tenant", "create", "acme"]);
    let created = server.ok(Some(&admin), &["token", "create", "acme", "--json"]);
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();

    let pushed = server.ok(
        Some(&token),
        &["module", "push", &fixture("add_ten"), "--name", "adder"],
    );
    assert!(pushed.contains("sha256:"), "{pushed}");
    let listed = server.ok(Some(&token), &["module", "list"]);
    // A reader that stops early (`| head -1`) is not an error.
    let mut piped = Command::new(BIN)
        .args([
            "module",
            "show",
            "adder",
            "--server",
            &server.url,
            "--token",
            &token,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let piped = piped.wait_with_output().unwrap();
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert!(
        listed.starts_with("NAME") && listed.contains("adder"),
        "{listed}"
    );
    let out = server.ok(
        Some(&token),
        &["module", "call", "adder", "_main", "--input", "5"],
    );
    assert_eq!(out.trim(), "15");
    // A manifest stored at push gives direct calls their config.
    server.ok(
        Some(&token),
        &[
            "module",
            "push",
            &fixture("vars_config"),
            "--name",
            "greeter",
            "--config",
            "greeting=Hi",
        ],
    );
    let greeted = server.ok(
        Some(&token),
        &["module", "call", "greeter", "greet", "--input", "Ada"],
    );
    assert_eq!(greeted.trim(), "Hi, Ada!");
    let manifest = server.ok(Some(&token), &["module", "manifest", "greeter"]);
    assert!(manifest.contains("\"greeting\": \"Hi\""), "{manifest}");
    server.ok(Some(&token), &["kv", "set", "greeting", "hello"]);
    assert_eq!(
        server.ok(Some(&token), &["kv", "get", "greeting"]).trim(),
        "hello"
    );
    let keys: serde_json::Value =
        serde_json::from_str(&server.ok(Some(&token), &["kv", "list", "--json"])).unwrap();
    assert_eq!(keys["keys"], serde_json::json!(["greeting"]));

    // Errors are one clear line and a non-zero exit code.
    let failed = server.cli(
        Some(&token),
        &["module", "call", "adder", "_main", "--input", "\"x\""],
    );
    assert!(!failed.status.success());
    let stderr = String::from_utf8(failed.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("(guest_error)"),
        "{stderr}"
    );
    let denied = server.cli(Some(&token), &["tenant", "list"]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("(forbidden)"));
    let unauthenticated = server.cli(None, &["module", "list"]);
    assert!(String::from_utf8_lossy(&unauthenticated.stderr).contains("(unauthorized)"));

    let status = server.terminate();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");

    // A restart on the same data directory keeps tokens, modules and KV, and does not
    // print a new admin token.
    let again = Server::start(dir.path());
    assert!(again.admin_token.is_none());
    assert_eq!(
        again.ok(Some(&token), &["kv", "get", "greeting"]).trim(),
        "hello"
    );
    let out = again.ok(
        Some(&token),
        &["module", "call", "adder", "_main", "--input", "1"],
    );
    assert_eq!(out.trim(), "11");
    again.ok(Some(&admin), &["tenant", "list"]);
}

#[test]
fn unreachable_agent_is_a_clear_error() {
    let out = Command::new(BIN)
        .args([
            "module",
            "list",
            "--server",
            "http://127.0.0.1:9",
            "--token",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");
}

/// The admin's view of the policy in force.
fn policy(server: &Server, admin: &str) -> serde_json::Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        reqwest::Client::new()
            .get(format!("{}/v1/policy", server.url))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

/// Issue 11: the operator's policy is reloadable; SIGHUP reads the config file again.
#[cfg(unix)]
#[test]
fn a_hangup_reloads_the_policy_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[policy.default]\nmax_timeout_ms = 1000\n").unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with(&data, &[("DEADLIFT_CONFIG", config.to_str().unwrap())]);
    let admin = server.admin_token.clone().unwrap();
    assert_eq!(policy(&server, &admin)["default"]["max_timeout_ms"], 1000);
    std::fs::write(&config, "[policy.default]\nmax_timeout_ms = 2000\n").unwrap();
    let hangup = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hangup.success());
    let mut seen = serde_json::Value::Null;
    for _ in 0..100 {
        seen = policy(&server, &admin)["default"]["max_timeout_ms"].clone();
        if seen == 2000 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(seen, 2000);
}

/// Issue 14: `module delete`, `kv set`, `kv delete`, `runs retry` and `peer remove`
/// printed nothing with `--json`; every action now answers a JSON document with it.
#[test]
fn actions_answer_json_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server.admin_token.clone().unwrap();
    server.ok(Some(&admin), &["tenant", "create", "acme"]);
    let created = server.ok(Some(&admin), &["token", "create", "acme", "--json"]);
    let token: serde_json::Value = serde_json::from_str(&created).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let json = |args: &[&str]| -> serde_json::Value {
        let out = server.ok(Some(&token), args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
    };
    server.ok(
        Some(&token),
        &["module", "push", &fixture("add_ten"), "--name", "adder"],
    );
    assert_eq!(json(&["kv", "set", "k", "v", "--json"])["stored"], true);
    assert_eq!(json(&["kv", "delete", "k", "--json"])["deleted"], true);
    assert_eq!(
        json(&["module", "delete", "adder", "--json"])["deleted"],
        "adder"
    );
    // Issue 14: an admin without --tenant was told about an HTTP header.
    let out = server.cli(Some(&admin), &["module", "list"]);
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("--tenant"), "{message}");
}

/// Issue 14: `deadlift run` added a newline to the plug-in's output (`ff fe` became
/// `ff fe 0a`), and log lines carried colour escapes into files and pipes.
#[test]
fn run_prints_the_output_bytes_exactly_and_no_colour_into_a_pipe() {
    let out = Command::new(BIN)
        .args(["run", &fixture("echo"), "echo", "--input", "no newline"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"no newline");
    assert!(!out.stderr.is_empty(), "info lines were logged");
    assert!(
        !out.stderr.contains(&0x1b),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 15: `module test` replays a module's recorded calls through new bytes.
#[test]
fn module_test_replays_recorded_calls_through_new_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server.admin_token.clone().unwrap();
    server.ok(Some(&admin), &["tenant", "create", "acme"]);
    let created = server.ok(Some(&admin), &["token", "create", "acme", "--json"]);
    let token: serde_json::Value = serde_json::from_str(&created).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    server.ok(
        Some(&token),
        &["module", "push", &fixture("add_ten"), "--name", "adder"],
    );
    for input in ["1", "2"] {
        server.ok(
            Some(&token),
            &["module", "call", "adder", "_main", "--input", input],
        );
    }
    let candidate = fixture("multiply_by_five");
    let mut report = serde_json::Value::Null;
    // Tapes are written in the background: ask until both are there.
    for _ in 0..100 {
        let out = server.ok(
            Some(&token),
            &["module", "test", &candidate, "--against", "adder", "--json"],
        );
        report = serde_json::from_str(&out).unwrap();
        if report["total"] == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(report["changed"], 2, "{report}");
    assert_eq!(report["calls"][1]["recorded"]["output"], 12);
    assert_eq!(report["calls"][1]["replayed"]["output"], 10);
    let table = server.ok(
        Some(&token),
        &["module", "test", &fixture("add_ten"), "--against", "adder"],
    );
    assert!(table.contains("2 calls: 2 identical, 0 changed"), "{table}");
}
