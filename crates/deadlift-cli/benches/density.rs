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
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{
    ServerUrl, Target, env_or, futures_join, next_random, percentile, start_server, tenant_tokens,
    wait_ready,
};

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

#[tokio::main]
async fn main() {
    let small: usize = env_or("SMALL", 100_000);
    let large: usize = env_or("LARGE", 1_000);
    let tenants: usize = env_or("TENANTS", 1_000);
    let seconds: u64 = env_or("SECONDS", 30);
    let concurrency: usize = env_or("CONCURRENCY", 4);
    let (mut server, _data) = start_server(env_or("PORT", 18_471)).await;
    let http = reqwest::Client::new();
    let tokens = tenant_tokens(&http, &server, tenants).await;

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
