//! Density: many tenants' modules on one agent. Drives a release `deadlift serve` over
//! HTTP (so that any build, a baseline included, runs the same steps):
//!
//! 1. registers `SMALL` distinct tiny Extism guests (one guest, differing in a custom
//!    section) over `TENANTS` tenants, then `LARGE` distinct ~110 KB Rust guests
//!    (`add_ten` with a custom section), calling each once, and samples the agent's
//!    resident memory as the count grows;
//! 2. calls them all under a Zipf(1.1) load for `SECONDS` (calls/s, p50, p99);
//! 3. restarts the agent and times how long until it answers a call again.
//!
//! `scripts/bench-density` runs it; environment: `DEADLIFT_BIN` (the server),
//! `SMALL`, `LARGE`, `TENANTS`, `SECONDS`, `CONCURRENCY`, `SERVER_ARGS`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "density-bench-admin-token-0123456789abcdef";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tiny Extism guest (`_main` answers nothing) made distinct by a custom section.
fn tiny_module(n: usize) -> Vec<u8> {
    // (module (memory (export "memory") 1) (func (export "_main") (result i32) i32.const 0))
    let mut bytes = vec![
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7f, // type: () -> i32
        0x03, 0x02, 0x01, 0x00, // function 0 of type 0
        0x05, 0x03, 0x01, 0x00, 0x01, // memory: min 1
        0x07, 0x12, 0x02, // exports: 2
        0x06, b'm', b'e', b'm', b'o', b'r', b'y', 0x02, 0x00, // "memory" memory 0
        0x05, b'_', b'm', b'a', b'i', b'n', 0x00, 0x00, // "_main" func 0
        0x0a, 0x06, 0x01, 0x04, 0x00, 0x41, 0x00, 0x0b, // code: i32.const 0
    ];
    with_custom_section(&mut bytes, n);
    bytes
}

/// Appends a custom section `variant` holding `n`, which changes the module's hash
/// and nothing else.
fn with_custom_section(bytes: &mut Vec<u8>, n: usize) {
    let name = b"variant";
    let payload = n.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    bytes.push(0x00);
    bytes.push(u8::try_from(size).expect("small section"));
    bytes.push(u8::try_from(name.len()).expect("short name"));
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(&payload);
}

struct Server {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn start(&mut self) {
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

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Resident memory of the server, in MiB.
    fn rss_mib(&self) -> f64 {
        let Some(child) = &self.child else { return 0.0 };
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    fn url(&self, path: &str) -> String {
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
struct Target {
    token: Arc<str>,
    name: String,
}

/// Zipf(s) over `n` ranks: the cumulative weights, for sampling by binary search.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut total = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|k| {
            total += 1.0 / (k as f64).powf(s);
            total
        })
        .collect();
    for weight in &mut cdf {
        *weight /= total;
    }
    cdf
}

/// xorshift64*: enough randomness for picking ranks, no dependency.
fn next_random(state: &mut u64) -> f64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let small: usize = env_or("SMALL", 100_000);
    let large: usize = env_or("LARGE", 1_000);
    let tenants: usize = env_or("TENANTS", 1_000);
    let seconds: u64 = env_or("SECONDS", 30);
    let concurrency: usize = env_or("CONCURRENCY", 4);
    let bin = PathBuf::from(std::env::var("DEADLIFT_BIN").expect("DEADLIFT_BIN names the server"));
    let data = tempfile::tempdir().expect("temporary directory");
    std::fs::write(data.path().join("admin-token"), ADMIN_TOKEN).expect("token file");
    let mut perms = std::fs::metadata(data.path().join("admin-token"))
        .expect("token file")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(data.path().join("admin-token"), perms).expect("token mode");
    let mut server = Server {
        bin,
        data: data.path().to_owned(),
        port: env_or("PORT", 18_471),
        child: None,
    };
    let http = reqwest::Client::new();
    server.start();
    let ready = wait_ready(&http, &server).await;
    println!("started in {:.0} ms", ready.as_secs_f64() * 1e3);

    let mut tokens: Vec<Arc<str>> = Vec::with_capacity(tenants);
    for t in 0..tenants {
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
            .json(&serde_json::json!({ "description": "density" }))
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("token JSON");
        tokens.push(Arc::from(token["token"].as_str().expect("a token")));
    }

    let large_base =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/wasm/add_ten.wasm"))
            .expect("add_ten fixture");
    let mut targets: Vec<Target> = Vec::with_capacity(small + large);
    let started = Instant::now();
    let mut rows = Vec::new();
    let step = (small / 10).max(1);
    let total = small + large;
    let mut next = 0;
    while next < total {
        let batch_end = if next < small {
            (next + step).min(small)
        } else {
            total
        };
        let batch: Vec<(Target, Vec<u8>)> = (next..batch_end)
            .map(|i| {
                let target = Target {
                    token: tokens[i % tenants].clone(),
                    name: format!("m{i}"),
                };
                let bytes = if i < small {
                    tiny_module(i)
                } else {
                    let mut bytes = large_base.clone();
                    with_custom_section(&mut bytes, i);
                    bytes
                };
                (target, bytes)
            })
            .collect();
        let chunks: Vec<Vec<(Target, Vec<u8>)>> = batch
            .chunks(batch.len().div_ceil(concurrency))
            .map(<[_]>::to_vec)
            .collect();
        let tasks: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let http = http.clone();
                let server_url = server.url("");
                async move {
                    let server = ServerUrl(server_url);
                    for (target, bytes) in chunk {
                        server.upload(&http, &target, bytes).await;
                        assert!(
                            server.call(&http, &target).await,
                            "first call of {}",
                            target.name
                        );
                    }
                }
            })
            .collect();
        futures_join(tasks).await;
        targets.extend(batch.into_iter().map(|(t, _)| t));
        next = batch_end;
        let row = (
            targets.len(),
            server.rss_mib(),
            started.elapsed().as_secs_f64(),
        );
        println!(
            "{} modules: {:.0} MiB resident, {:.0} s",
            row.0, row.1, row.2
        );
        let _ = std::io::stdout().flush();
        rows.push(row);
    }

    // The Zipf load: rank 1 is the hottest; ranks are shuffled over the modules so that
    // hot modules are small and large alike.
    let cdf = Arc::new(zipf_cdf(targets.len(), 1.1));
    let mut order: Vec<usize> = (0..targets.len()).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        let j = (next_random(&mut seed) * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }
    let ranked: Arc<Vec<Target>> = Arc::new(order.iter().map(|&i| targets[i].clone()).collect());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (http, cdf, ranked) = (http.clone(), cdf.clone(), ranked.clone());
            let server = ServerUrl(server.url(""));
            async move {
                let mut seed = 0x1234_5678_9abc_def1u64 ^ (worker as u64 + 1);
                let mut latencies = Vec::new();
                let mut failures = 0u64;
                while Instant::now() < deadline {
                    let u = next_random(&mut seed);
                    let rank = cdf.partition_point(|w| *w < u).min(ranked.len() - 1);
                    let start = Instant::now();
                    if !server.call(&http, &ranked[rank]).await {
                        failures += 1;
                    }
                    latencies.push(start.elapsed());
                }
                (latencies, failures)
            }
        })
        .collect();
    let results = futures_join(tasks).await;
    let failures: u64 = results.iter().map(|(_, f)| f).sum();
    let mut latencies: Vec<Duration> = results.into_iter().flat_map(|(l, _)| l).collect();
    latencies.sort();
    let rate = latencies.len() as f64 / seconds as f64;
    let rss_after_load = server.rss_mib();

    server.stop();
    let restart = Instant::now();
    server.start();
    wait_ready(&http, &server).await;
    let first = &ranked[0];
    let base = ServerUrl(server.url(""));
    while !base.call(&http, first).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let restart_to_ready = restart.elapsed();

    println!();
    println!("| modules | resident memory (MiB) | elapsed (s) |");
    println!("|---|---|---|");
    for (count, rss, elapsed) in &rows {
        println!("| {count} | {rss:.0} | {elapsed:.0} |");
    }
    println!();
    println!(
        "Zipf(1.1) over {} modules, {concurrency} connections, {seconds} s: {rate:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms, {failures} failed; {rss_after_load:.0} MiB resident after. Restart to the first answered call: {:.0} ms.",
        ranked.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        restart_to_ready.as_secs_f64() * 1e3
    );
}

/// The server's address, for tasks that outlive a borrow of [`Server`].
struct ServerUrl(String);

impl ServerUrl {
    async fn upload(&self, http: &reqwest::Client, target: &Target, bytes: Vec<u8>) {
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

    async fn call(&self, http: &reqwest::Client, target: &Target) -> bool {
        http.post(format!("{}/v1/modules/{}/call/_main", self.0, target.name))
            .bearer_auth(&*target.token)
            .body("1")
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}

/// Runs the futures to completion together, in order of their results.
async fn futures_join<F: std::future::Future + Send + 'static>(tasks: Vec<F>) -> Vec<F::Output>
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

async fn wait_ready(http: &reqwest::Client, server: &Server) -> Duration {
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
