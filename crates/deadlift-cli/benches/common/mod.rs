//! What the HTTP benchmarks share: a release `deadlift serve` they start and stop, its
//! resident memory, tenants with tokens, calls, percentiles.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "density-bench-admin-token-0123456789abcdef";

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Server {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
}

impl Server {
    pub fn start(&mut self) {
        let token_file = self.data.join("admin-token");
        let mut command = Command::new(&self.bin);
        command
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data.join("agent"))
            .arg("--admin-token-file")
            .arg(&token_file)
            .arg("--durability")
            .arg("process-crash")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Ok(extra) = std::env::var("SERVER_ARGS") {
            command.args(extra.split_whitespace());
        }
        self.child = Some(command.spawn().expect("the server starts"));
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Resident memory of the server, in MiB.
    pub fn rss_mib(&self) -> f64 {
        let Some(child) = &self.child else { return 0.0 };
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A module the load can call: its tenant's token and its name.
#[derive(Clone)]
pub struct Target {
    pub token: Arc<str>,
    pub name: String,
}

/// xorshift64*: enough randomness for picking ranks, no dependency.
pub fn next_random(state: &mut u64) -> f64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
}

pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

/// The server's address, for tasks that outlive a borrow of [`Server`].
pub struct ServerUrl(pub String);

impl ServerUrl {
    pub async fn upload(&self, http: &reqwest::Client, target: &Target, bytes: Vec<u8>) {
        let response = http
            .post(format!("{}/v1/modules", self.0))
            .bearer_auth(&*target.token)
            .query(&[("name", target.name.as_str())])
            .body(bytes)
            .send()
            .await
            .expect("upload sent");
        assert!(
            response.status().is_success(),
            "upload of {} failed: {}",
            target.name,
            response.text().await.unwrap_or_default()
        );
    }

    pub async fn call(&self, http: &reqwest::Client, target: &Target) -> bool {
        http.post(format!("{}/v1/modules/{}/call/_main", self.0, target.name))
            .bearer_auth(&*target.token)
            .body("1")
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}

/// Runs the futures to completion together, in order of their results.
pub async fn futures_join<F: std::future::Future + Send + 'static>(tasks: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(handle.await.expect("a load task panicked"));
    }
    results
}

pub async fn wait_ready(http: &reqwest::Client, server: &Server) -> Duration {
    let start = Instant::now();
    loop {
        if http
            .get(server.url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the server never became ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the server named by `DEADLIFT_BIN` on `port` with a fresh data directory
/// (kept alive by the returned guard) and waits until it is ready.
pub async fn start_server(port: u16) -> (Server, tempfile::TempDir) {
    let bin = PathBuf::from(std::env::var("DEADLIFT_BIN").expect("DEADLIFT_BIN names the server"));
    let data = tempfile::tempdir().expect("temporary directory");
    let token_file = data.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).expect("token file");
    let mut perms = std::fs::metadata(&token_file)
        .expect("token file")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(&token_file, perms).expect("token mode");
    let mut server = Server {
        bin,
        data: data.path().to_owned(),
        port,
        child: None,
    };
    server.start();
    let ready = wait_ready(&reqwest::Client::new(), &server).await;
    println!("started in {:.0} ms", ready.as_secs_f64() * 1e3);
    (server, data)
}

/// Tenants `tenant-0` … and a token of each, made by the admin.
pub async fn tenant_tokens(http: &reqwest::Client, server: &Server, count: usize) -> Vec<Arc<str>> {
    let mut tokens = Vec::with_capacity(count);
    for t in 0..count {
        let tenant = format!("tenant-{t}");
        let created = http
            .post(server.url("/v1/tenants"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "name": tenant }))
            .send()
            .await
            .expect("tenant");
        assert!(created.status().is_success(), "tenant {tenant}");
        let token: serde_json::Value = http
            .post(server.url(&format!("/v1/tenants/{tenant}/tokens")))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "description": "bench" }))
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("token JSON");
        tokens.push(Arc::from(token["token"].as_str().expect("a token")));
    }
    tokens
}
