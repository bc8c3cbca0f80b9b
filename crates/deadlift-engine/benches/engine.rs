//! Our engine against the `extism` SDK, side by side in one run, on the same fixtures:
//! warm trivial calls, `count_vowels` on 43 bytes and 64 KiB, host-function calls, new
//! instances, and aggregate throughput on one and two threads.
//!
//! Run: `RUST_LIB_BACKTRACE=0 cargo bench -p deadlift --bench engine`
//! (see BENCHMARKS.md for results and the machine they came from).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use deadlift_engine::{CallContext, Engine, Grant, HostFunction, ModuleId, NewModule};
use extism::{CompiledPlugin, Function, Manifest, PTR, Plugin, PluginBuilder, UserData, Wasm};

const TENANT: &str = "bench";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../guests/wasm/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

fn engine(max_idle: usize) -> Engine {
    Engine::builder()
        .workers(2)
        .max_idle_per_pool(max_idle)
        .host_function(HostFunction::bytes(
            "reflect",
            |_, input| Ok(input.to_vec()),
        ))
        .build()
        .expect("engine")
}

fn register(engine: &Engine, name: &str) -> ModuleId {
    engine
        .add_module(
            TENANT,
            NewModule {
                name: name.replace('_', "-"),
                bytes: fixture(name),
                ..NewModule::default()
            },
        )
        .expect("module")
        .id
}

fn grant() -> Grant {
    Grant::default()
        .allow(["reflect"])
        .with_max_input_bytes(1 << 20)
        .with_timeout(Duration::from_secs(30))
}

fn sdk_functions() -> Vec<Function> {
    vec![Function::new(
        "reflect",
        [PTR],
        [PTR],
        UserData::new(()),
        |plugin, inputs, outputs, _| {
            let input: Vec<u8> = plugin.memory_get_val(&inputs[0])?;
            plugin.memory_set_val(&mut outputs[0], input)?;
            Ok(())
        },
    )]
}

fn sdk_compiled(name: &str) -> CompiledPlugin {
    let manifest = Manifest::new([Wasm::data(fixture(name))]).with_timeout(Duration::from_secs(30));
    PluginBuilder::new(manifest)
        .with_wasi(false)
        .with_cache_disabled()
        .with_functions(sdk_functions())
        .compile()
        .expect("sdk compile")
}

fn sdk_plugin(name: &str) -> Plugin {
    Plugin::new_from_compiled(&sdk_compiled(name)).expect("sdk plugin")
}

/// (fixture, function, input) cases measured as warm calls on one thread.
fn warm_cases() -> Vec<(&'static str, &'static str, &'static str, Vec<u8>)> {
    let vowels_64k: Vec<u8> = (0..65_536u32)
        .map(|i| b"the quick brown fox jumps over the lazy dog "[(i % 44) as usize])
        .collect();
    vec![
        ("noop", "echo", "noop", Vec::new()),
        ("add_ten", "add_ten", "_main", b"5".to_vec()),
        (
            "count_vowels_43B",
            "count_vowels",
            "count_vowels",
            b"The quick brown fox jumps over the lazy dog".to_vec(),
        ),
        (
            "count_vowels_64KiB",
            "count_vowels",
            "count_vowels",
            vowels_64k,
        ),
        (
            "host_call_x1",
            "host_caller",
            "call_reflect",
            b"ping".to_vec(),
        ),
        (
            "host_call_x100",
            "host_caller",
            "call_reflect_n",
            b"100".to_vec(),
        ),
    ]
}

fn warm_calls(c: &mut Criterion) {
    let ours = engine(8);
    let ctx = CallContext::new(TENANT);
    let grant = grant();
    let mut group = c.benchmark_group("warm_call");
    for (case, fixture_name, function, input) in warm_cases() {
        let module = register(&ours, fixture_name);
        ours.call_blocking(&module, function, &input, &grant, &ctx)
            .expect("our call works");
        group.bench_with_input(BenchmarkId::new("deadlift", case), &input, |b, input| {
            b.iter(|| {
                black_box(
                    ours.call_blocking(&module, function, input, &grant, &ctx)
                        .expect("call"),
                )
            })
        });
        let mut sdk = sdk_plugin(fixture_name);
        sdk.call::<&[u8], &[u8]>(function, &input)
            .expect("sdk call works");
        group.bench_with_input(BenchmarkId::new("extism", case), &input, |b, input| {
            b.iter(|| {
                black_box(
                    sdk.call::<&[u8], &[u8]>(function, input)
                        .expect("call")
                        .len(),
                )
            })
        });
    }
    group.finish();
}

/// A new instance and its first call: ours with no warm pool, the SDK's
/// `Plugin::new_from_compiled` (compilation excluded on both sides).
fn new_instance(c: &mut Criterion) {
    let ours = engine(0);
    let module = register(&ours, "add_ten");
    let ctx = CallContext::new(TENANT);
    let grant = grant();
    let compiled = sdk_compiled("add_ten");
    let mut group = c.benchmark_group("new_instance");
    group.bench_function("deadlift", |b| {
        b.iter(|| {
            black_box(
                ours.call_blocking(&module, "_main", b"5", &grant, &ctx)
                    .expect("call"),
            )
        })
    });
    group.bench_function("extism", |b| {
        b.iter(|| {
            let mut plugin = Plugin::new_from_compiled(&compiled).expect("plugin");
            black_box(plugin.call::<&[u8], Vec<u8>>("_main", b"5").expect("call"))
        })
    });
    group.finish();
}

/// The WASI guest (`guests/zig`, wasm32-wasi) with WASI granted and one directory
/// mapped, on both sides: a new instance with its first call, and a warm call.
fn wasi_guest(c: &mut Criterion) {
    let dir = std::env::temp_dir().join("deadlift-bench-wasi");
    std::fs::create_dir_all(&dir).expect("bench directory");
    std::fs::write(dir.join("hello.txt"), "hello\n").expect("bench file");
    let host = dir.to_str().expect("UTF-8 path").to_owned();
    let ctx = CallContext::new(TENANT);
    let mut grant = grant().with_wasi().with_dir(&host, "/data", true);
    grant.max_var_bytes = 1 << 20;
    let manifest = Manifest::new([Wasm::data(fixture("zig_guest"))])
        .with_timeout(Duration::from_secs(30))
        .with_allowed_path(format!("ro:{host}"), "/data");
    let compiled = PluginBuilder::new(manifest)
        .with_wasi(true)
        .with_cache_disabled()
        .with_functions(sdk_functions())
        .compile()
        .expect("sdk compile");

    let mut group = c.benchmark_group("wasi_guest");
    for (case, function, input) in [
        ("greet", "greet", b"Ada".as_slice()),
        ("read_file", "read_file", b"/data/hello.txt".as_slice()),
    ] {
        let cold = engine(0);
        let module = register(&cold, "zig_guest");
        group.bench_function(BenchmarkId::new("deadlift_new_instance", case), |b| {
            b.iter(|| {
                black_box(
                    cold.call_blocking(&module, function, input, &grant, &ctx)
                        .expect("call"),
                )
            })
        });
        group.bench_function(BenchmarkId::new("extism_new_instance", case), |b| {
            b.iter(|| {
                let mut plugin = Plugin::new_from_compiled(&compiled).expect("plugin");
                black_box(
                    plugin
                        .call::<&[u8], Vec<u8>>(function, input)
                        .expect("call"),
                )
            })
        });
        let warm = engine(8);
        let module = register(&warm, "zig_guest");
        group.bench_function(BenchmarkId::new("deadlift_warm", case), |b| {
            b.iter(|| {
                black_box(
                    warm.call_blocking(&module, function, input, &grant, &ctx)
                        .expect("call"),
                )
            })
        });
        let mut plugin = Plugin::new_from_compiled(&compiled).expect("plugin");
        group.bench_function(BenchmarkId::new("extism_warm", case), |b| {
            b.iter(|| {
                black_box(
                    plugin
                        .call::<&[u8], Vec<u8>>(function, input)
                        .expect("call"),
                )
            })
        });
    }
    group.finish();
}

/// Aggregate warm `add_ten` calls spread over `threads` threads; returns the elapsed time
/// for `iters` calls in all.
fn spread<S: Send + 'static>(
    threads: u64,
    iters: u64,
    make: impl Fn() -> S,
    call: impl Fn(&mut S) + Send + Sync + 'static,
) -> Duration {
    let call = Arc::new(call);
    let per_thread = iters.div_ceil(threads);
    let barrier = Arc::new(std::sync::Barrier::new(threads as usize + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let mut state = make();
            let (call, barrier) = (call.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..per_thread {
                    call(&mut state);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for handle in handles {
        handle.join().expect("bench thread");
    }
    start.elapsed()
}

fn throughput(c: &mut Criterion) {
    let ours = engine(8);
    let module = register(&ours, "add_ten");
    let compiled = sdk_compiled("add_ten");
    let mut group = c.benchmark_group("throughput_add_ten");
    for threads in [1u64, 2] {
        group.throughput(criterion::Throughput::Elements(1));
        let engine = ours.clone();
        group.bench_function(BenchmarkId::new("deadlift_threads", threads), |b| {
            b.iter_custom(|iters| {
                let engine = engine.clone();
                spread(
                    threads,
                    iters,
                    || (CallContext::new(TENANT), grant()),
                    move |(ctx, grant)| {
                        black_box(
                            engine
                                .call_blocking(&module, "_main", b"5", grant, ctx)
                                .expect("call"),
                        );
                    },
                )
            })
        });
        let compiled = compiled.clone();
        group.bench_function(BenchmarkId::new("extism_threads", threads), |b| {
            b.iter_custom(|iters| {
                spread(
                    threads,
                    iters,
                    || Plugin::new_from_compiled(&compiled).expect("plugin"),
                    |plugin: &mut Plugin| {
                        black_box(plugin.call::<&[u8], Vec<u8>>("_main", b"5").expect("call"));
                    },
                )
            })
        });
    }
    // The async API: a batch of calls in flight on the engine's worker pool. One tenant
    // runs on every worker but the spare (kept for tenants with nothing running): 3 is
    // the default on this 2-core machine (the cores, plus one).
    for workers in [1usize, 2, 3] {
        let engine = Engine::builder().workers(workers).build().expect("engine");
        let module = register(&engine, "add_ten");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        group.bench_function(BenchmarkId::new("deadlift_async_workers", workers), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    let mut remaining = iters;
                    while remaining > 0 {
                        let batch = remaining.min(256);
                        let mut calls = tokio::task::JoinSet::new();
                        for _ in 0..batch {
                            let engine = engine.clone();
                            calls.spawn(async move {
                                let ctx = CallContext::new(TENANT);
                                engine.call(&module, "_main", b"5", &grant(), &ctx).await
                            });
                        }
                        while let Some(result) = calls.join_next().await {
                            black_box(result.expect("task").expect("call"));
                        }
                        remaining -= batch;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = warm_calls, new_instance, throughput, wasi_guest
}
criterion_main!(benches);
