//! Differential compatibility: every fixture, over a corpus of inputs and call
//! sequences, runs through our engine and through the `extism` SDK (the reference), and
//! outputs, error classes, guest messages and var state must match.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadlift_engine::{CallError, CallOutput, Engine, Grant, HostFunction, MemoryKv, MemorySink};
use extism::{Function, Manifest, PTR, PluginBuilder, UserData, Val, Wasm};

use crate::common::{TENANT, ctx, fixture};

/// What a call came to, in terms both runtimes can express.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Output(Vec<u8>),
    /// The guest failed with this message (error_set).
    GuestError(String),
    ExitCode(i32),
    /// The export does not exist.
    NotFound,
    /// Wasm execution was aborted: a trap, or a failing host or env function (the SDK
    /// reports both as errors raised inside wasm).
    Aborted,
    Timeout,
    OutOfFuel,
    OutOfMemory,
}

fn ours(result: Result<CallOutput, CallError>) -> Outcome {
    match result {
        Ok(out) => Outcome::Output(out.output),
        Err(CallError::Guest { code: 134, .. })
        | Err(CallError::Trap { .. })
        | Err(CallError::HostFunction { .. }) => Outcome::Aborted,
        Err(CallError::FunctionNotFound { .. }) => Outcome::NotFound,
        Err(CallError::Guest { message, .. }) => Outcome::GuestError(message),
        Err(CallError::ExitCode { code }) => Outcome::ExitCode(code),
        Err(CallError::Timeout { .. }) => Outcome::Timeout,
        Err(CallError::FuelExhausted { .. }) => Outcome::OutOfFuel,
        Err(CallError::MemoryLimit { .. }) => Outcome::OutOfMemory,
        Err(other) => panic!("unexpected error class from our engine: {other:?}"),
    }
}

fn sdk_outcome(result: Result<Vec<u8>, extism::Error>) -> Outcome {
    let error = match result {
        Ok(bytes) => return Outcome::Output(bytes),
        Err(error) => error,
    };
    let top = error.to_string();
    let root = error.root_cause().to_string();
    let chain = format!("{error:?}");
    if top == "timeout" {
        Outcome::Timeout
    } else if top.contains("out of fuel") {
        Outcome::OutOfFuel
    } else if top == "oom" || root == "oom" {
        Outcome::OutOfMemory
    } else if let Some(code) = top.strip_prefix("Returned non-zero exit code: ") {
        Outcome::ExitCode(code.parse().expect("exit code"))
    } else if top.starts_with("Function not found") {
        Outcome::NotFound
    } else if chain.contains("wasm trap") || chain.contains("wasm backtrace") {
        Outcome::Aborted
    } else {
        Outcome::GuestError(top)
    }
}

/// Limits and config applied identically to both runtimes.
#[derive(Clone)]
struct Setup {
    config: Vec<(&'static str, &'static str)>,
    memory_pages: u32,
    timeout: Duration,
    fuel: Option<u64>,
    max_var_bytes: u64,
    wasi: bool,
    /// Host directory (`ro:` prefix for read-only) → guest path, as in an SDK manifest.
    allowed_paths: Vec<(String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            config: Vec::new(),
            memory_pages: 256,
            timeout: Duration::from_secs(5),
            fuel: None,
            max_var_bytes: 1024 * 1024,
            wasi: false,
            allowed_paths: Vec::new(),
        }
    }
}

const HOST_FUNCTIONS: [&str; 4] = ["reflect", "kv_get", "kv_set", "kv_delete"];

impl Setup {
    fn grant(&self) -> Grant {
        let mut grant = Grant::default()
            .allow(HOST_FUNCTIONS)
            .allow(["emit"])
            .with_memory_bytes(u64::from(self.memory_pages) * 65536)
            .with_timeout(self.timeout)
            .with_max_var_bytes(self.max_var_bytes)
            .with_max_input_bytes(64 << 20)
            .with_max_output_bytes(64 << 20);
        grant.fuel = self.fuel;
        grant.wasi = self.wasi;
        grant.allowed_paths = self.allowed_paths.iter().cloned().collect();
        for (k, v) in &self.config {
            grant = grant.with_config(*k, *v);
        }
        grant
    }

    fn sdk_plugin(&self, bytes: &[u8]) -> extism::Plugin {
        let mut manifest = Manifest::new([Wasm::data(bytes.to_vec())])
            .with_memory_max(self.memory_pages)
            .with_timeout(self.timeout);
        manifest.memory.max_var_bytes = Some(self.max_var_bytes);
        for (k, v) in &self.config {
            manifest = manifest.with_config_key(*k, *v);
        }
        for (host, guest) in &self.allowed_paths {
            manifest = manifest.with_allowed_path(host.clone(), guest);
        }
        let mut builder = PluginBuilder::new(manifest)
            .with_wasi(self.wasi)
            .with_cache_disabled()
            .with_functions(sdk_host_functions());
        if let Some(fuel) = self.fuel {
            builder = builder.with_fuel_limit(fuel);
        }
        builder.build().expect("the SDK loads the fixture")
    }
}

/// The SDK's versions of the host functions our engine offers: same names, same
/// behaviour (a key-value map, an echo, an event list).
fn sdk_host_functions() -> Vec<Function> {
    let kv = UserData::new(HashMap::<String, Vec<u8>>::new());
    let reflect = Function::new(
        "reflect",
        [PTR],
        [PTR],
        UserData::new(()),
        |plugin, inputs, outputs, _| {
            let input: Vec<u8> = plugin.memory_get_val(&inputs[0])?;
            plugin.memory_set_val(&mut outputs[0], input)?;
            Ok(())
        },
    );
    let kv_get = Function::new(
        "kv_get",
        [PTR],
        [PTR],
        kv.clone(),
        |plugin, inputs, outputs, kv| {
            let key: String = plugin.memory_get_val(&inputs[0])?;
            let value = kv.get()?.lock().expect("kv").get(&key).cloned();
            match value {
                Some(value) => plugin.memory_set_val(&mut outputs[0], value)?,
                None => outputs[0] = Val::I64(0),
            }
            Ok(())
        },
    );
    let kv_set = Function::new(
        "kv_set",
        [PTR, PTR],
        [],
        kv.clone(),
        |plugin, inputs, _, kv| {
            let key: String = plugin.memory_get_val(&inputs[0])?;
            let value: Vec<u8> = plugin.memory_get_val(&inputs[1])?;
            kv.get()?.lock().expect("kv").insert(key, value);
            Ok(())
        },
    );
    let kv_delete = Function::new("kv_delete", [PTR], [], kv, |plugin, inputs, _, kv| {
        let key: String = plugin.memory_get_val(&inputs[0])?;
        kv.get()?.lock().expect("kv").remove(&key);
        Ok(())
    });
    let emit = Function::new(
        "emit",
        [PTR],
        [],
        UserData::new(()),
        |plugin, inputs, _, _| {
            let event: serde_json::Value =
                serde_json::from_slice(&plugin.memory_get_val::<Vec<u8>>(&inputs[0])?)?;
            anyhow::ensure!(
                event.get("type").is_some_and(|t| t.is_string()),
                "event needs a type"
            );
            Ok(())
        },
    );
    vec![reflect, kv_get, kv_set, kv_delete, emit]
}

fn our_engine() -> Engine {
    Engine::builder()
        .workers(1)
        .max_instances(16)
        .kv(Arc::new(MemoryKv::new()))
        .events(Arc::new(MemorySink::new()))
        .host_function(HostFunction::bytes(
            "reflect",
            |_, input| Ok(input.to_vec()),
        ))
        .build()
        .expect("engine")
}

/// Runs `calls` in order through both runtimes, each on one instance, and compares
/// every outcome.
fn compare(fixture_name: &str, setup: &Setup, calls: &[(&str, Vec<u8>)]) {
    let bytes = fixture(fixture_name);
    let engine = our_engine();
    let module = engine
        .add_module(
            TENANT,
            deadlift_engine::NewModule {
                name: fixture_name.replace('_', "-"),
                bytes: bytes.clone(),
                ..Default::default()
            },
        )
        .expect("our registry accepts the fixture")
        .id;
    let grant = setup.grant();
    let mut sdk = setup.sdk_plugin(&bytes);
    for (step, (function, input)) in calls.iter().enumerate() {
        let expected = sdk_outcome(sdk.call::<&[u8], Vec<u8>>(function, input.as_slice()));
        let actual = ours(engine.call_blocking(&module, function, input, &grant, &ctx(TENANT)));
        assert_eq!(
            actual,
            expected,
            "{fixture_name} step {step}: {function}({} bytes) differs from the SDK",
            input.len()
        );
        if matches!(
            expected,
            Outcome::Aborted | Outcome::Timeout | Outcome::OutOfFuel | Outcome::OutOfMemory
        ) {
            // The SDK keeps a broken instance; we discard it. Compare fresh from here on.
            sdk = setup.sdk_plugin(&bytes);
        }
    }
}

/// Inputs every fixture sees: empty, small, large and non-UTF-8.
fn corpus() -> Vec<Vec<u8>> {
    let large: Vec<u8> = (0..70_000u32)
        .map(|i| b"the quick brown fox jumps over a lazy dog "[(i % 42) as usize])
        .collect();
    vec![
        Vec::new(),
        b"hello world".to_vec(),
        b"5".to_vec(),
        b"-3".to_vec(),
        b"2.5".to_vec(),
        large,
        vec![0xff, 0xfe, 0x00, 0x80, b'a', b'e'],
    ]
}

fn all_inputs(function: &'static str) -> Vec<(&'static str, Vec<u8>)> {
    corpus()
        .into_iter()
        .map(|input| (function, input))
        .collect()
}

#[test]
fn json_entry_points_match() {
    for name in ["add_ten", "multiply_by_five"] {
        compare(name, &Setup::default(), &all_inputs("_main"));
    }
}

#[test]
fn count_vowels_matches_with_state_and_config() {
    let mut calls = all_inputs("count_vowels");
    calls.extend(all_inputs("count_vowels"));
    compare("count_vowels", &Setup::default(), &calls);
    let custom = Setup {
        config: vec![("vowels", "xyz")],
        ..Setup::default()
    };
    compare("count_vowels", &custom, &all_inputs("count_vowels"));
}

#[test]
fn echo_matches() {
    let mut calls = all_inputs("echo");
    calls.push(("noop", Vec::new()));
    calls.push(("missing_export", Vec::new()));
    compare("echo", &Setup::default(), &calls);
}

#[test]
fn host_function_callers_match() {
    let mut calls = all_inputs("call_reflect");
    calls.push(("call_reflect_n", b"50".to_vec()));
    compare("host_caller", &Setup::default(), &calls);
    let kv = [
        ("increment", b"a".to_vec()),
        ("increment", b"a".to_vec()),
        ("increment", b"b".to_vec()),
        ("get", b"a".to_vec()),
        ("reset", b"a".to_vec()),
        ("get", b"a".to_vec()),
        ("increment", vec![0xff, 0xfe]),
    ];
    compare("kv_counter", &Setup::default(), &kv);
    let events = [
        ("emit_event", br#"{"type":"a.b","data":{"n":1}}"#.to_vec()),
        ("emit_event", br#"{"data":1}"#.to_vec()),
        ("emit_event", b"not json".to_vec()),
    ];
    compare("emitter", &Setup::default(), &events);
}

#[test]
fn vars_and_config_match() {
    let calls = [
        ("greet", b"Bob".to_vec()),
        ("greet", Vec::new()),
        ("get_count", Vec::new()),
        ("set_var", b"colour=blue".to_vec()),
        ("get_var", b"colour".to_vec()),
        ("set_var", b"empty=".to_vec()),
        ("get_var", b"empty".to_vec()),
        ("del_var", b"colour".to_vec()),
        ("get_var", b"colour".to_vec()),
        ("get_config", b"greeting".to_vec()),
        ("get_config", b"absent".to_vec()),
        ("set_var", format!("big={}", "x".repeat(2000)).into_bytes()),
        ("get_var", b"big".to_vec()),
    ];
    let setup = Setup {
        config: vec![("greeting", "Howdy")],
        max_var_bytes: 1000,
        ..Setup::default()
    };
    compare("vars_config", &setup, &calls);
    compare("vars_config", &Setup::default(), &calls);
    let disabled = Setup {
        max_var_bytes: 0,
        ..Setup::default()
    };
    compare(
        "vars_config",
        &disabled,
        &[("set_var", b"a=b".to_vec()), ("get_count", Vec::new())],
    );
}

#[test]
fn errors_and_traps_match() {
    let calls = [
        ("fail", b"x".to_vec()),
        ("fail", vec![0xff]),
        ("fail_code_only", Vec::new()),
        ("ok", Vec::new()),
    ];
    compare("guest_error", &Setup::default(), &calls);
    let traps = [
        ("trap", Vec::new()),
        ("divide", b"5".to_vec()),
        ("divide", b"0".to_vec()),
        ("divide", b"2".to_vec()),
    ];
    compare("trapper", &Setup::default(), &traps);
    let state = [
        ("next", Vec::new()),
        ("next", Vec::new()),
        ("trap_after_increment", Vec::new()),
        ("next", Vec::new()),
    ];
    compare("stateful_counter", &Setup::default(), &state);
}

#[test]
fn limits_match() {
    let timeout = Setup {
        timeout: Duration::from_millis(100),
        ..Setup::default()
    };
    compare(
        "looper",
        &timeout,
        &[("loop_forever", Vec::new()), ("spin", b"10".to_vec())],
    );
    let fuel = Setup {
        fuel: Some(200_000),
        ..Setup::default()
    };
    compare(
        "looper",
        &fuel,
        &[("spin", b"100000000".to_vec()), ("spin", b"10".to_vec())],
    );
    compare(
        "allocator",
        &Setup::default(),
        &[
            ("alloc_mib", b"2".to_vec()),
            ("alloc_forever", Vec::new()),
            ("alloc_mib", b"1".to_vec()),
        ],
    );
}

/// The common exports of the C and Zig guests (`guests/c`, `guests/zig`).
fn other_language_calls() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("greet", b"Ada".to_vec()),
        ("greet", Vec::new()),
        ("count", Vec::new()),
        ("count", Vec::new()),
        ("count", b"ignored".to_vec()),
        ("call_reflect", b"xyz".to_vec()),
        ("call_reflect", Vec::new()),
        ("call_reflect", vec![0xff, 0x00, 0x80]),
        ("missing_export", Vec::new()),
    ]
}

#[test]
fn guests_in_c_and_zig_match() {
    let greeting = Setup {
        config: vec![("greeting", "Hi")],
        ..Setup::default()
    };
    compare("c_guest", &Setup::default(), &other_language_calls());
    compare("c_guest", &greeting, &other_language_calls());

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hello from the host\n").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/bin.dat"), vec![7u8; 10_000]).unwrap();
    std::fs::write(dir.path().join("empty.txt"), "").unwrap();
    let host = dir.path().to_str().unwrap().to_owned();
    let mut calls = other_language_calls();
    for path in [
        "/data/hello.txt",
        "/data/sub/bin.dat",
        "/data/empty.txt",
        "/data/missing.txt",
        "/data/sub",
        "/etc/passwd",
        "/data/../../etc/passwd",
        "",
    ] {
        calls.push(("read_file", path.as_bytes().to_vec()));
    }
    for mapping in [host.clone(), format!("ro:{host}")] {
        let wasi = Setup {
            wasi: true,
            allowed_paths: vec![(mapping, "/data".into())],
            ..greeting.clone()
        };
        compare("zig_guest", &wasi, &calls);
    }
}

/// Issue 12: `count_vowels` needed 17 pages under the SDK's `max_pages` and 19–26 here
/// (the budget charged the initial memory and every later growth as one total), so
/// plug-ins tuned against the SDK failed. The budget now has the SDK's meaning: the
/// initial memory must fit, then growth is counted afresh.
#[test]
fn the_fewest_pages_a_plugin_needs_are_the_sdks() {
    let bytes = crate::common::fixture("count_vowels");
    let engine = our_engine();
    let module = crate::common::add_bytes(
        &engine,
        crate::common::TENANT,
        "count_vowels",
        bytes.clone(),
    );
    for input in [b"Hello, World!".to_vec(), vec![b'a'; 300_000]] {
        for pages in [16, 17] {
            let setup = Setup {
                memory_pages: pages,
                ..Setup::default()
            };
            // Twice: the second call meets the memory the first left.
            let ours = (0..2)
                .map(|_| {
                    engine
                        .call_blocking(
                            &module,
                            "count_vowels",
                            &input,
                            &setup.grant(),
                            &crate::common::ctx(crate::common::TENANT),
                        )
                        .is_ok()
                })
                .collect::<Vec<_>>();
            let mut plugin = setup.sdk_plugin(&bytes);
            let sdk = (0..2)
                .map(|_| {
                    plugin
                        .call::<&[u8], Vec<u8>>("count_vowels", &input)
                        .is_ok()
                })
                .collect::<Vec<_>>();
            assert_eq!(ours, sdk, "{pages} pages, {} bytes of input", input.len());
            assert_eq!(ours, [pages >= 17; 2], "{pages} pages");
        }
    }
}
