//! A real nats-server for the cluster tests: the current release that
//! `scripts/nats-server` installs into the user's cache, with JetStream on, listening on
//! 127.0.0.1 on a port it picks (read from its ports file), its store in a temporary
//! directory. Dropping it kills the server.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/nats-server");
        let installed = Command::new(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("scripts/nats-server runs");
        assert!(installed.status.success(), "scripts/nats-server failed");
        let binary = String::from_utf8(installed.stdout)
            .unwrap()
            .trim()
            .to_owned();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(&binary)
            .args(["--jetstream", "--addr", "127.0.0.1", "--port", "-1"])
            .arg("--store_dir")
            .arg(dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let url = wait_for_port(dir.path(), child.id());
        Self {
            url,
            child,
            _dir: dir,
        }
    }
}

/// The client URL from the server's ports file (`nats-server_<pid>.ports`).
fn wait_for_port(dir: &Path, pid: u32) -> String {
    let file = dir.join(format!("nats-server_{pid}.ports"));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(url) = ports["nats"][0].as_str()
        {
            return url.to_owned();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nats-server wrote no ports file in 20 s");
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
