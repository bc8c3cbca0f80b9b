//! Hook calls through a whole agent (issue 16): the plug-in bound at a hook calls a host
//! function that waits 10 ms of simulated I/O, blocking (the thread sleeps) or async (the
//! future sleeps); every hook call is recorded as a run in the journal. Prints one table,
//! both kinds side by side in one run.
//!
//! `cargo bench -p deadlift-cli --bench hooks`; environment: `SECONDS` (default 5),
//! `CALLERS` (concurrent hook calls, default 64).

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadlift::hooks::{Binding, HookDecl};
use deadlift::{Agent, Grant, HostFunction, NewModule};

const WAIT: Duration = Duration::from_millis(10);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

async fn agent(dir: &std::path::Path, reflect: HostFunction) -> Arc<Agent> {
    let grant = Grant::default()
        .allow(["reflect"])
        .with_timeout(Duration::from_secs(5));
    let (agent, _) = Agent::builder(dir)
        .workers(2)
        .engine(|engine| engine.max_instances(1024))
        .host_function(reflect)
        .hook(HookDecl::new("before_charge", grant))
        .build()
        .expect("agent");
    let bytes = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/wasm/host_caller.wasm"),
    )
    .expect("fixture");
    agent.db().create_tenant("acme").expect("tenant");
    agent
        .engine()
        .add_module(
            "acme",
            NewModule {
                name: "caller".into(),
                bytes,
                ..NewModule::default()
            },
        )
        .expect("module");
    agent
        .hooks()
        .bind(
            "acme",
            Binding {
                hook: "before_charge".into(),
                module: "caller".into(),
                function: "call_reflect".into(),
                pinned: None,
                updated_unix_ms: 0,
            },
        )
        .await
        .expect("bind");
    Arc::new(agent)
}

async fn drive(
    agent: &Arc<Agent>,
    callers: usize,
    length: Duration,
) -> (usize, usize, Vec<Duration>) {
    let deadline = Instant::now() + length;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0);
                while Instant::now() < deadline {
                    let began = Instant::now();
                    match agent
                        .hook("before_charge")
                        .call("acme", serde_json::json!({"charge": "ch_1"}))
                        .await
                    {
                        Ok(_) => latencies.push(began.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (latencies, failed) = task.await.expect("caller");
        all.extend(latencies);
        errors += failed;
    }
    all.sort_unstable();
    (all.len(), errors, all)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let length = Duration::from_secs(env_or("SECONDS", 5));
    let callers: usize = env_or("CALLERS", 64);
    println!(
        "\n### Hook calls through the agent, host function waiting {WAIT:?} ({callers} callers, 2 workers)\n"
    );
    println!("| host function | hook calls/s | p50 ms | p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|");
    let kinds = [
        (
            "blocking",
            HostFunction::bytes("reflect", |_ctx, input| {
                std::thread::sleep(WAIT);
                Ok(input.to_vec())
            }),
        ),
        (
            "async",
            HostFunction::bytes_async("reflect", |_ctx, input| async move {
                tokio::time::sleep(WAIT).await;
                Ok(input)
            }),
        ),
    ];
    for (name, reflect) in kinds {
        let dir = tempfile::tempdir().expect("temporary directory");
        let agent = agent(dir.path(), reflect).await;
        let started = Instant::now();
        let (calls, errors, latencies) = drive(&agent, callers, length).await;
        let rate = calls as f64 / started.elapsed().as_secs_f64();
        println!(
            "| {name} | {rate:.0} | {:.2} | {:.2} | {errors} |",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99)
        );
        agent.shutdown().await;
    }
}
