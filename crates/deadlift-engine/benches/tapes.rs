//! Tapes on the call path (issue 15, the engine's part): a warm call making 10 host calls,
//! without a tape, recording one, and replaying one, side by side in one run (medians of
//! rounds taking turns). The agent does not record tapes yet; this is what recording
//! costs the engine.
//!
//! `cargo bench -p deadlift-engine --bench tapes`; `TAPES_BENCH_SECS` (default 5).

use std::time::{Duration, Instant};

use deadlift_engine::tape::Tape;
use deadlift_engine::{CallContext, Engine, Grant, HostFunction, NewModule};

const TENANT: &str = "bench";
const ROUNDS: usize = 5;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Recording,
    Replaying,
}

async fn rate(
    engine: &Engine,
    module: deadlift_engine::ModuleId,
    mode: Mode,
    callers: usize,
    length: Duration,
    recorded: &[deadlift_engine::tape::HostCall],
) -> f64 {
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (engine, recorded) = (engine.clone(), recorded.to_vec());
            tokio::spawn(async move {
                let grant = Grant::default().allow(["reflect"]);
                let mut calls = 0usize;
                while Instant::now() < deadline {
                    let ctx = match mode {
                        Mode::Plain => CallContext::new(TENANT),
                        Mode::Recording => CallContext::new(TENANT).with_tape(Tape::recording()),
                        Mode::Replaying => {
                            CallContext::new(TENANT).with_tape(Tape::replaying(recorded.clone()))
                        }
                    };
                    engine
                        .call(&module, "call_reflect_n", b"10", &grant, &ctx)
                        .await
                        .expect("call");
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for task in tasks {
        calls += task.await.expect("caller");
    }
    calls as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let secs: u64 = std::env::var("TAPES_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let round = Duration::from_secs(secs) / ROUNDS as u32;
    runtime.block_on(async {
        let engine = Engine::builder()
            .workers(2)
            .max_instances(64)
            .host_function(HostFunction::bytes("reflect", |_ctx, input| {
                Ok(input.to_vec())
            }))
            .build()
            .expect("engine");
        let bytes = std::fs::read(format!(
            "{}/../../guests/wasm/host_caller.wasm",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("fixture");
        let module = engine
            .add_module(
                TENANT,
                NewModule {
                    name: "caller".into(),
                    bytes,
                    ..NewModule::default()
                },
            )
            .expect("module")
            .id;
        let tape = Tape::recording();
        engine
            .call(
                &module,
                "call_reflect_n",
                b"10",
                &Grant::default().allow(["reflect"]),
                &CallContext::new(TENANT).with_tape(tape.clone()),
            )
            .await
            .expect("recording");
        let recorded = tape.calls();
        println!("\n### Tapes: a warm call making 10 host calls (medians of {ROUNDS} rounds)\n");
        println!("| tape | calls/s, 1 caller | calls/s, 4 callers |");
        println!("|---|---:|---:|");
        let modes = [
            (Mode::Plain, "none"),
            (Mode::Recording, "recording"),
            (Mode::Replaying, "replaying"),
        ];
        let mut results = vec![(Vec::new(), Vec::new()); modes.len()];
        for _ in 0..ROUNDS {
            for (index, (mode, _)) in modes.iter().enumerate() {
                results[index]
                    .0
                    .push(rate(&engine, module, *mode, 1, round, &recorded).await);
                results[index]
                    .1
                    .push(rate(&engine, module, *mode, 4, round, &recorded).await);
            }
        }
        for (index, (_, name)) in modes.iter().enumerate() {
            let median = |values: &mut Vec<f64>| {
                values.sort_by(f64::total_cmp);
                values[values.len() / 2]
            };
            let (one, four) = &mut results[index];
            println!("| {name} | {:.0} | {:.0} |", median(one), median(four));
        }
    });
}
