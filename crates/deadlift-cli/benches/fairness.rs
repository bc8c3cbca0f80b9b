//! Fairness: tenant A floods the agent with calls that each run for its whole one-second
//! timeout, while tenant B makes trivial calls one after another. Reports B's latency
//! (p50, p99, max) and what became of A's calls. Drives a release `deadlift serve` over
//! HTTP, so a baseline build runs the same steps.
//!
//! `scripts/bench-fairness` runs it; environment: `DEADLIFT_BIN`, `SECONDS` (default
//! 20), `FLOOD` (A's connections, default 16).

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{ServerUrl, Target, env_or, futures_join, percentile, start_server, tenant_tokens};

#[tokio::main]
async fn main() {
    let seconds: u64 = env_or("SECONDS", 20);
    let flood: usize = env_or("FLOOD", 16);
    let (server, _data) = start_server(env_or("PORT", 18_472)).await;
    let http = reqwest::Client::new();
    let tokens = tenant_tokens(&http, &server, 2).await;
    let base = ServerUrl(server.url(""));
    let fixture = |name: &str| {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../../guests/wasm/{name}.wasm")),
        )
        .expect("fixture")
    };
    let looper = Target {
        token: tokens[0].clone(),
        name: "looper".into(),
    };
    let adder = Target {
        token: tokens[1].clone(),
        name: "adder".into(),
    };
    base.upload(&http, &looper, fixture("looper")).await;
    base.upload(&http, &adder, fixture("add_ten")).await;
    assert!(base.call(&http, &adder).await);

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let statuses = Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<u16, u64>::new(),
    ));
    let flooders: Vec<_> = (0..flood)
        .map(|_| {
            let (http, looper, statuses) = (http.clone(), looper.clone(), statuses.clone());
            let base = ServerUrl(base.0.clone());
            async move {
                while Instant::now() < deadline {
                    let status = http
                        .post(format!("{}/v1/modules/looper/call/loop_forever", base.0))
                        .bearer_auth(&*looper.token)
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16());
                    *statuses.lock().expect("counts").entry(status).or_default() += 1;
                    if status == 429 {
                        // Shed: back off as `Retry-After` asks, then flood again.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
        .collect();
    let flooding = tokio::spawn(futures_join(flooders));
    // Let the flood fill the queues first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    let mut failures = 0;
    while Instant::now() < deadline {
        let start = Instant::now();
        if !base.call(&http, &adder).await {
            failures += 1;
        }
        latencies.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    flooding.await.expect("the flood ends");
    latencies.sort();
    println!("| B's calls | p50 (ms) | p99 (ms) | max (ms) | B failed | A's answers by status |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {:.2} | {:.2} | {:.0} | {failures} | {:?} |",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        statuses.lock().expect("counts"),
    );
}
