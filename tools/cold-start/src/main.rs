//! Cold start of a never-seen module: compile time with Cranelift (what the engine
//! uses) and with Winch (wasmtime's baseline compiler), and how fast the code each makes
//! runs a CPU-bound export. Prints a Markdown table.
//!
//! `cargo run --release --manifest-path tools/cold-start/Cargo.toml -- guests/wasm/*.wasm`

use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, Linker, Module, Store, Strategy};

/// The engine's settings (tail calls and function references on) with Cranelift;
/// Winch supports neither, so its engine has them off.
fn engine(strategy: Strategy) -> Engine {
    let optimizing = matches!(strategy, Strategy::Cranelift);
    let mut config = Config::new();
    config
        .strategy(strategy)
        .wasm_tail_call(optimizing)
        .wasm_function_references(optimizing);
    Engine::new(&config).expect("engine")
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Median time to compile `bytes`, over `runs` compiles.
fn compile_time(engine: &Engine, bytes: &[u8], runs: usize) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                Module::new(engine, bytes).expect("compiles");
                start.elapsed()
            })
            .collect(),
    )
}

/// Median time of a loop of `n` iterations in a tiny guest: the speed of the code.
fn loop_time(engine: &Engine, n: i64) -> Duration {
    let module = Module::new(
        engine,
        r#"(module (func (export "spin") (param i64) (result i64) (local i64)
            (loop $l (local.set 1 (i64.add (local.get 1) (i64.mul (local.get 0) (i64.const 3))))
              (local.set 0 (i64.sub (local.get 0) (i64.const 1)))
              (br_if $l (i64.gt_s (local.get 0) (i64.const 0))))
            (local.get 1)))"#,
    )
    .expect("spin compiles");
    let mut store = Store::new(engine, ());
    let instance = Linker::new(engine)
        .instantiate(&mut store, &module)
        .expect("instantiates");
    let spin = instance
        .get_typed_func::<i64, i64>(&mut store, "spin")
        .expect("spin");
    median(
        (0..5)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(spin.call(&mut store, n).expect("runs"));
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let cranelift = engine(Strategy::Cranelift);
    let winch = engine(Strategy::Winch);
    println!("| module | size | Cranelift compile | Winch compile | ratio |");
    println!("|---|---|---|---|---|");
    for path in std::env::args().skip(1) {
        let bytes = std::fs::read(&path).expect("readable module");
        let optimized = compile_time(&cranelift, &bytes, 7);
        let baseline = compile_time(&winch, &bytes, 7);
        println!(
            "| `{}` | {} KB | {:.1} ms | {:.1} ms | {:.1}× |",
            path.rsplit('/').next().unwrap_or(&path),
            bytes.len() / 1000,
            optimized.as_secs_f64() * 1e3,
            baseline.as_secs_f64() * 1e3,
            optimized.as_secs_f64() / baseline.as_secs_f64()
        );
    }
    let n = 100_000_000;
    let fast = loop_time(&cranelift, n);
    let slow = loop_time(&winch, n);
    println!();
    println!(
        "A CPU-bound loop ({n} iterations): Cranelift {:.1} ms, Winch {:.1} ms ({:.1}× slower).",
        fast.as_secs_f64() * 1e3,
        slow.as_secs_f64() * 1e3,
        slow.as_secs_f64() / fast.as_secs_f64()
    );
}
