//! The README, followed literally (issue 14: its quick start pushed `add_ten` under a name
//! the workflow section did not use, and its example workflow always failed over HTTP).
//! Its agent, workflow, replay, release and peer commands run here as written, against real agents, with
//! `deadlift` being this build's binary. Lines that hold a placeholder for something
//! only a person can fill in (`<run id>`) are left out; the admin token, the agents'
//! addresses and where the second agent keeps its files are filled in.

use std::process::Command;

use crate::{BIN, Server};

/// The lines of the first ```sh block after `marker`, continued lines joined.
fn block_after(readme: &str, marker: &str) -> Vec<String> {
    let start = readme.find(marker).expect("the README has the section");
    let rest = &readme[start..];
    let open = rest.find("```sh\n").expect("a shell block follows") + "```sh\n".len();
    let body = &rest[open..open + rest[open..].find("```").expect("the block ends")];
    body.replace("\\\n", " ")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readmes_agent_workflow_and_peer_commands_work_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server
        .admin_token
        .clone()
        .expect("the admin token is printed");
    let mut lines = block_after(&readme, "With the agent running, in another");
    lines.extend(block_after(&readme, "## Workflows, events and runs"));
    lines.extend(block_after(
        &readme,
        "## Trying a new version on real traffic",
    ));
    lines.extend(block_after(
        &readme,
        "A module name has versions, and one of them is live",
    ));
    lines.extend(block_after(&readme, "## Agents talking to agents"));
    // The second agent of the peers section: a free port, files in the temporary directory.
    let acme_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let acme_data = dir.path().join("acme-data");
    let acme_token = dir.path().join("acme-admin.token");
    let mut script = String::from(
        "set -euo pipefail\ndeadlift() { \"$DEADLIFT_BIN\" \"$@\"; }\n\
         trap 'for job in $(jobs -p); do pkill -P \"$job\"; kill \"$job\"; done 2>/dev/null || true' EXIT\n",
    );
    let mut left_out = Vec::new();
    for line in lines {
        let line = line
            .replace("<the admin token>", &admin)
            .replace("http://127.0.0.1:8080", &server.url)
            .replace("127.0.0.1:8081", &format!("127.0.0.1:{acme_port}"))
            .replace("./acme-data", &acme_data.display().to_string())
            .replace("acme-admin.token", &acme_token.display().to_string());
        if line.trim_start().starts_with("alias deadlift=") {
            continue;
        }
        if line.contains('<') {
            left_out.push(line);
            continue;
        }
        // A command sent to the background writes nowhere: this test waits for the end
        // of the script's output.
        match line.split_once(" &") {
            Some((command, comment))
                if comment.trim_start().is_empty() || comment.trim_start().starts_with('#') =>
            {
                script.push_str(command);
                script.push_str(" >/dev/null 2>&1 &\n");
            }
            _ => {
                script.push_str(&line);
                script.push('\n');
            }
        }
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("DEADLIFT_BIN", BIN)
        .env("DEADLIFT_SERVER", &server.url)
        .env_remove("DEADLIFT_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the README's commands failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the README's comments promise.
    assert!(stdout.lines().any(|l| l.trim() == "15"), "{stdout}");
    assert!(stdout.contains("Hi, Ada!"), "{stdout}");
    assert!(stdout.contains("status     succeeded"), "{stdout}");
    // The event for Acme reaches Acme's agent: the platform's outbox says delivered.
    let mut outbox = String::new();
    for _ in 0..100 {
        outbox = server.ok(Some(&admin), &["peer", "outbox", "--json"]);
        if outbox.contains("\"delivered\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(outbox.contains("\"delivered\""), "{outbox}");
    // Only the lines that need a person's reading of an earlier answer were left out.
    assert!(
        left_out
            .iter()
            .all(|l| l.contains("<hash") || l.contains("<run id>") || l.contains("<id>")),
        "{left_out:?}"
    );
}
