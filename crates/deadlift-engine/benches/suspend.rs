//! Async host functions and time slicing, measured side by side in one run (issue 16).
//! Prints three tables:
//!
//! 1. hook calls per second on 2 workers with a host function that waits 10 ms of
//!    simulated I/O: blocking (`HostFunction::bytes`, the thread sleeps) against async
//!    (`HostFunction::bytes_async`, the future sleeps), with latency percentiles;
//! 2. the cost of the suspendable path on calls that never wait: a warm trivial call and
//!    a warm host call, on today's blocking path and on the suspendable one (a fiber per
//!    call; what an engine with time slicing runs every call on);
//! 3. a CPU-bound tenant and another tenant's short calls on one worker: the short
//!    calls' latency without and with time slicing.
//!
//! `cargo bench -p deadlift-engine --bench suspend` (release build). Set
//! `SUSPEND_BENCH_SECS` to change each measurement's length (default 5).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use deadlift_engine::{CallContext, Engine, Grant, HostFunction, ModuleId, NewModule};

const TENANT: &str = "bench";
const WAIT: Duration = Duration::from_millis(10);

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../guests/wasm/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

fn add(engine: &Engine, tenant: &str, name: &str) -> ModuleId {
    engine
        .add_module(
            tenant,
            NewModule {
                name: name.to_owned(),
                bytes: fixture(name),
                ..NewModule::default()
            },
        )
        .expect("module registers")
        .id
}

fn seconds() -> Duration {
    let secs = std::env::var("SUSPEND_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

/// Percentile of sorted latencies, in ms.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

struct Load {
    calls: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Load {
    fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
}

/// Keeps `concurrency` calls in flight for `length`.
#[allow(clippy::too_many_arguments)]
async fn drive(
    engine: &Engine,
    module: ModuleId,
    function: &'static str,
    input: &'static [u8],
    grant: Grant,
    tenant: &'static str,
    concurrency: usize,
    length: Duration,
) -> Load {
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (engine, grant) = (engine.clone(), grant.clone());
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0);
                let ctx = CallContext::new(tenant);
                while Instant::now() < deadline {
                    let began = Instant::now();
                    match engine.call(&module, function, input, &grant, &ctx).await {
                        Ok(_) => latencies.push(began.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut load = Load {
        calls: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for task in tasks {
        let (latencies, errors) = task.await.expect("driver task");
        load.calls += latencies.len();
        load.errors += errors;
        load.latencies.extend(latencies);
    }
    load.elapsed = started.elapsed();
    load.latencies.sort_unstable();
    load
}

fn row(name: &str, load: &Load) {
    println!(
        "| {name} | {:.0} | {:.2} | {:.2} | {} |",
        load.per_second(),
        percentile(&load.latencies, 0.50),
        percentile(&load.latencies, 0.99),
        load.errors
    );
}

async fn waiting_on_io(length: Duration) {
    println!("\n### 1. Hook calls with a host function that waits {WAIT:?} (2 workers)\n");
    println!("| host function | calls/s | p50 ms | p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|");
    let grant = Grant::default()
        .allow(["reflect"])
        .with_timeout(Duration::from_secs(5));
    let blocking = Engine::builder()
        .workers(2)
        .max_instances(1024)
        .host_function(HostFunction::bytes("reflect", |_ctx, input| {
            std::thread::sleep(WAIT);
            Ok(input.to_vec())
        }))
        .build()
        .expect("engine");
    let module = add(&blocking, TENANT, "host_caller");
    // As many callers as the async engine gets: the blocking one queues them.
    let load = drive(
        &blocking,
        module,
        "call_reflect",
        b"hi",
        grant.clone(),
        TENANT,
        64,
        length,
    )
    .await;
    row("blocking, 64 callers", &load);
    let asynchronous = Engine::builder()
        .workers(2)
        .max_instances(1024)
        .host_function(HostFunction::bytes_async(
            "reflect",
            |_ctx, input| async move {
                tokio::time::sleep(WAIT).await;
                Ok(input)
            },
        ))
        .build()
        .expect("engine");
    let module = add(&asynchronous, TENANT, "host_caller");
    for callers in [64, 256] {
        let load = drive(
            &asynchronous,
            module,
            "call_reflect",
            b"hi",
            grant.clone(),
            TENANT,
            callers,
            length,
        )
        .await;
        row(&format!("async, {callers} callers"), &load);
    }
}

async fn never_waiting(length: Duration) {
    println!("\n### 2. Calls that never wait: blocking path against the suspendable path\n");
    println!(
        "Medians of {ROUNDS} rounds, the two paths taking turns (this machine's noise is larger than the difference within one round)."
    );
    println!("\n| call | path | calls/s, 1 caller | p50 µs | p99 µs | calls/s, 4 callers |");
    println!("|---|---|---:|---:|---:|---:|");
    let engines = [false, true].map(|sliced| {
        let engine = Engine::builder()
            .workers(2)
            .max_instances(64)
            .time_slice(sliced.then_some(Duration::from_millis(10)))
            .host_function(HostFunction::bytes("reflect", |_ctx, input| {
                Ok(input.to_vec())
            }))
            .build()
            .expect("engine");
        let adder = add(&engine, TENANT, "add_ten");
        let caller = add(&engine, TENANT, "host_caller");
        (engine, adder, caller)
    });
    let round = length / ROUNDS as u32;
    for kind in ["trivial (add_ten)", "host call (reflect)"] {
        // Per path: (calls/s, p50, p99, calls/s with 4 callers) of each round.
        let mut results: [Vec<[f64; 4]>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (path, (engine, adder, caller)) in engines.iter().enumerate() {
                let (module, function, input, grant) = if kind.starts_with("trivial") {
                    (*adder, "_main", &b"5"[..], Grant::default())
                } else {
                    (
                        *caller,
                        "call_reflect",
                        &b"hi"[..],
                        Grant::default().allow(["reflect"]),
                    )
                };
                let one = drive(
                    engine,
                    module,
                    function,
                    input,
                    grant.clone(),
                    TENANT,
                    1,
                    round,
                )
                .await;
                let four = drive(engine, module, function, input, grant, TENANT, 4, round).await;
                results[path].push([
                    one.per_second(),
                    percentile(&one.latencies, 0.50) * 1000.0,
                    percentile(&one.latencies, 0.99) * 1000.0,
                    four.per_second(),
                ]);
            }
        }
        for (path, name) in ["blocking", "suspendable (fiber)"].iter().enumerate() {
            let median = |column: usize| {
                let mut values: Vec<f64> = results[path].iter().map(|r| r[column]).collect();
                values.sort_by(f64::total_cmp);
                values[values.len() / 2]
            };
            println!(
                "| {kind} | {name} | {:.0} | {:.1} | {:.1} | {:.0} |",
                median(0),
                median(1),
                median(2),
                median(3)
            );
        }
    }
}

/// Rounds of the never-waiting comparison.
const ROUNDS: usize = 5;

async fn slicing(length: Duration) {
    println!("\n### 3. One worker: a CPU-bound tenant, and another tenant's short calls\n");
    println!("| time slice | short calls/s | p50 ms | p99 ms | long calls ended |");
    println!("|---|---:|---:|---:|---:|");
    for slice in [None, Some(Duration::from_millis(5))] {
        let engine = Engine::builder()
            .workers(1)
            .max_instances(64)
            .time_slice(slice)
            .build()
            .expect("engine");
        let looper = add(&engine, "spinner", "looper");
        let adder = add(&engine, TENANT, "add_ten");
        let stop = Arc::new(AtomicBool::new(false));
        let spinner = {
            let (engine, stop) = (engine.clone(), stop.clone());
            tokio::spawn(async move {
                let grant = Grant::default().with_timeout(Duration::from_millis(100));
                let ctx = CallContext::new("spinner");
                let mut ended = 0;
                while !stop.load(Ordering::Relaxed) {
                    let _ = engine
                        .call(&looper, "loop_forever", b"", &grant, &ctx)
                        .await;
                    ended += 1;
                }
                ended
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let load = drive(
            &engine,
            adder,
            "_main",
            b"5",
            Grant::default(),
            TENANT,
            1,
            length,
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        let ended = spinner.await.expect("spinner");
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {ended} |",
            slice.map_or("off".to_owned(), |s| format!("{} ms", s.as_millis())),
            load.per_second(),
            percentile(&load.latencies, 0.50),
            percentile(&load.latencies, 0.99),
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let length = seconds();
    // `SUSPEND_BENCH_ONLY=2` runs one table (for a profiler).
    let only = std::env::var("SUSPEND_BENCH_ONLY").ok();
    let runs = |table: &str| only.as_deref().is_none_or(|only| only == table);
    runtime.block_on(async {
        if runs("1") {
            waiting_on_io(length).await;
        }
        if runs("2") {
            never_waiting(length).await;
        }
        if runs("3") {
            slicing(length).await;
        }
    });
}
