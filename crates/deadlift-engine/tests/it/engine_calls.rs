//! Calls that succeed or fail as a guest decides: outputs, errors, host functions,
//! logs, vars and config.

use std::sync::Arc;

use deadlift_engine::{CallError, Engine, Grant, HostFunction, LogLevel, MemoryKv, MemorySink};

use crate::common::{self, TENANT, add, add_bytes, call, ctx, text, wat};

#[test]
fn add_ten_and_multiply_by_five() {
    let engine = common::engine();
    let add_ten = add(&engine, TENANT, "add_ten");
    let times_five = add(&engine, TENANT, "multiply_by_five");
    let grant = Grant::default();
    assert_eq!(text(call(&engine, &add_ten, "_main", b"5", &grant)), "15");
    assert_eq!(
        text(call(&engine, &times_five, "_main", b"15", &grant)),
        "75"
    );
}

#[tokio::test]
async fn async_calls_run_on_workers() {
    let engine = common::engine();
    let add_ten = add(&engine, TENANT, "add_ten");
    let calls = (0..50).map(|n| {
        let engine = engine.clone();
        async move {
            engine
                .call(
                    &add_ten,
                    "_main",
                    n.to_string().as_bytes(),
                    &Grant::default(),
                    &ctx(TENANT),
                )
                .await
        }
    });
    for (n, result) in futures_results(calls).await.into_iter().enumerate() {
        assert_eq!(text(result), (n + 10).to_string());
    }
}

async fn futures_results<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.expect("task completes"));
    }
    results
}

#[test]
fn guest_errors_carry_code_and_message() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "guest_error");
    let grant = Grant::default();
    match call(&engine, &module, "fail", b"bad input", &grant) {
        Err(CallError::Guest { code, message }) => {
            assert_eq!(code, 1);
            assert_eq!(message, "guest failed: bad input");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        call(&engine, &module, "fail_code_only", b"", &grant).unwrap_err(),
        CallError::ExitCode { code: 3 }
    );
    assert_eq!(text(call(&engine, &module, "ok", b"", &grant)), "ok");
}

#[test]
fn non_number_input_is_a_guest_error_not_a_crash() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "add_ten");
    let err = call(&engine, &module, "_main", b"not json", &Grant::default()).unwrap_err();
    assert_eq!(err.code().as_str(), "guest_error", "{err:?}");
    assert_eq!(
        text(call(&engine, &module, "_main", b"1", &Grant::default())),
        "11"
    );
}

#[test]
fn traps_are_reported_with_their_cause() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "trapper");
    match call(&engine, &module, "trap", b"", &Grant::default()) {
        Err(CallError::Trap { message }) => assert!(message.contains("unreachable"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        call(&engine, &module, "divide", b"0", &Grant::default()),
        Err(CallError::Trap { .. })
    ));
    assert_eq!(
        text(call(&engine, &module, "divide", b"4", &Grant::default())),
        "25"
    );
}

#[test]
fn missing_function_and_wrong_signature() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "echo");
    assert_eq!(
        call(&engine, &module, "nope", b"", &Grant::default()).unwrap_err(),
        CallError::FunctionNotFound {
            function: "nope".into()
        }
    );
    let odd = add_bytes(
        &engine,
        TENANT,
        "odd",
        wat(r#"(module (func (export "takes_args") (param i32) (result i32) local.get 0))"#),
    );
    assert!(matches!(
        call(&engine, &odd, "takes_args", b"", &Grant::default()),
        Err(CallError::FunctionSignature { .. })
    ));
}

#[test]
fn echo_preserves_any_bytes() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "echo");
    let grant = Grant::default();
    for input in [
        &b""[..],
        b"hello",
        &[0xff, 0x00, 0xfe, 0x80],
        &vec![7u8; 300_000],
    ] {
        let out = call(&engine, &module, "echo", input, &grant).unwrap();
        assert_eq!(out.output, input);
    }
}

#[test]
fn embedder_host_functions_receive_the_call_context() {
    let engine = common::builder()
        .host_function(HostFunction::json("whoami", |ctx, input| {
            Ok(serde_json::json!({ "tenant": ctx.tenant, "run": ctx.run_id, "input": input }))
        }))
        .build()
        .unwrap();
    let module = add_bytes(
        &engine,
        TENANT,
        "whoami",
        wat(r#"(module
            (import "extism:host/env" "input_offset" (func $input (result i64)))
            (import "extism:host/env" "length" (func $length (param i64) (result i64)))
            (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
            (import "extism:host/user" "whoami" (func $whoami (param i64) (result i64)))
            (func (export "run") (result i32)
                (local $h i64)
                (local.set $h (call $whoami (call $input)))
                (call $output_set (local.get $h) (call $length (local.get $h)))
                (i32.const 0)))"#),
    );
    let grant = Grant::default().allow(["whoami"]);
    let out = engine
        .call_blocking(
            &module,
            "run",
            b"[1,2]",
            &grant,
            &ctx(TENANT).with_run_id("run-7"),
        )
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&out.output).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"tenant": TENANT, "run": "run-7", "input": [1, 2]})
    );
    // Input that is not JSON fails the call with the host function named.
    match engine.call_blocking(&module, "run", b"{", &grant, &ctx(TENANT)) {
        Err(CallError::HostFunction { name, .. }) => assert_eq!(name, "whoami"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn host_function_caller_round_trips_through_the_host() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "host_caller");
    let grant = Grant::default().allow(["reflect"]);
    assert_eq!(
        text(call(&engine, &module, "call_reflect", b"ping", &grant)),
        "ping"
    );
    assert_eq!(
        text(call(&engine, &module, "call_reflect_n", b"100", &grant)),
        "100"
    );
}

#[test]
fn a_host_function_that_is_not_granted_is_denied() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "host_caller");
    assert_eq!(
        call(&engine, &module, "call_reflect", b"x", &Grant::default()).unwrap_err(),
        CallError::HostFunctionDenied {
            name: "reflect".into()
        }
    );
}

#[test]
fn a_host_function_the_agent_does_not_offer_is_named() {
    let engine = Engine::builder()
        .workers(1)
        .max_instances(8)
        .build()
        .unwrap();
    let module = add(&engine, TENANT, "host_caller");
    let grant = Grant::default().allow(["reflect"]);
    assert_eq!(
        call(&engine, &module, "call_reflect", b"x", &grant).unwrap_err(),
        CallError::HostFunctionUnknown {
            name: "reflect".into()
        }
    );
}

#[test]
fn wasi_imports_are_denied_without_the_wasi_grant() {
    let engine = common::engine();
    let module = add_bytes(
        &engine,
        TENANT,
        "wasi",
        wat(r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "run") (result i32) (i32.const 0)))"#),
    );
    match call(&engine, &module, "run", b"", &Grant::default()) {
        Err(CallError::ImportDenied { module, name, .. }) => {
            assert_eq!(
                (module.as_str(), name.as_str()),
                ("wasi_snapshot_preview1", "fd_write")
            );
        }
        other => panic!("{other:?}"),
    }
}

const LOGGER: &str = r#"(module
    (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
    (import "extism:host/env" "store_u8" (func $store (param i64 i32)))
    (import "extism:host/env" "log_info" (func $info (param i64)))
    (import "extism:host/env" "log_debug" (func $debug (param i64)))
    (import "extism:host/env" "get_log_level" (func $level (result i32)))
    (func $msg (param $byte i32) (result i64)
        (local $h i64)
        (local.set $h (call $alloc (i64.const 1)))
        (call $store (local.get $h) (local.get $byte))
        (local.get $h))
    (func (export "log") (result i32)
        (call $info (call $msg (i32.const 73)))
        (call $debug (call $msg (i32.const 68)))
        (call $level)))"#;

#[test]
fn guest_logs_are_captured_per_call_at_the_engine_level() {
    let engine = common::builder().log_level(LogLevel::Info).build().unwrap();
    let module = add_bytes(&engine, TENANT, "logger", wat(LOGGER));
    // get_log_level reports Info (2), which the guest returns as its exit code.
    let err = call(&engine, &module, "log", b"", &Grant::default()).unwrap_err();
    assert_eq!(err, CallError::ExitCode { code: 2 });

    let engine = common::builder()
        .log_level(LogLevel::Error)
        .build()
        .unwrap();
    let module = add_bytes(&engine, TENANT, "logger", wat(LOGGER));
    assert_eq!(
        call(&engine, &module, "log", b"", &Grant::default()).unwrap_err(),
        CallError::ExitCode { code: 4 }
    );
}

#[test]
fn log_lines_carry_level_time_and_message() {
    let engine = common::builder()
        .log_level(LogLevel::Trace)
        .build()
        .unwrap();
    let module = add_bytes(
        &engine,
        TENANT,
        "logger",
        wat(&LOGGER.replace("(call $level)))", "(i32.const 0)))")),
    );
    let out = call(&engine, &module, "log", b"", &Grant::default()).unwrap();
    let lines: Vec<(LogLevel, &str)> = out
        .logs
        .iter()
        .map(|l| (l.level, l.message.as_str()))
        .collect();
    assert_eq!(lines, vec![(LogLevel::Info, "I"), (LogLevel::Debug, "D")]);
    assert!(out.logs[0].time_unix_ms > 1_600_000_000_000);
    // The next call starts with no lines of its own yet.
    let again = call(&engine, &module, "log", b"", &Grant::default()).unwrap();
    assert_eq!(again.logs.len(), 2);
}

#[test]
fn vars_persist_across_calls_and_config_comes_from_the_grant() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "vars_config");
    let grant = Grant::default().with_config("greeting", "Hi");
    assert_eq!(
        text(call(&engine, &module, "greet", b"Bob", &grant)),
        "Hi, Bob!"
    );
    assert_eq!(
        text(call(&engine, &module, "greet", b"Ann", &grant)),
        "Hi, Ann!"
    );
    assert_eq!(text(call(&engine, &module, "get_count", b"", &grant)), "2");
    assert_eq!(
        text(call(&engine, &module, "get_config", b"greeting", &grant)),
        "Hi"
    );
    assert_eq!(
        text(call(&engine, &module, "get_config", b"missing", &grant)),
        ""
    );
    call(&engine, &module, "set_var", b"colour=blue", &grant).unwrap();
    assert_eq!(
        text(call(&engine, &module, "get_var", b"colour", &grant)),
        "blue"
    );
    call(&engine, &module, "del_var", b"colour", &grant).unwrap();
    assert_eq!(
        text(call(&engine, &module, "get_var", b"colour", &grant)),
        ""
    );
    let plain = Grant::default();
    assert_eq!(
        text(call(&engine, &module, "greet", b"Cy", &plain)),
        "Hello, Cy!"
    );
}

#[test]
fn vars_are_capped_and_can_be_disabled() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "vars_config");
    let small = Grant::default().with_max_var_bytes(100);
    let big = format!("k={}", "v".repeat(200));
    match call(&engine, &module, "set_var", big.as_bytes(), &small) {
        Err(CallError::HostFunction { name, message }) => {
            assert_eq!(name, "var_set");
            assert!(message.contains("full"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let disabled = Grant::default().with_max_var_bytes(0);
    match call(&engine, &module, "set_var", b"a=b", &disabled) {
        Err(CallError::HostFunction { message, .. }) => {
            assert!(message.contains("disabled"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn kv_builtins_count_per_key() {
    let kv = Arc::new(MemoryKv::new());
    let engine = common::builder().kv(kv.clone()).build().unwrap();
    let module = add(&engine, TENANT, "kv_counter");
    let grant = Grant::default().allow(["kv_get", "kv_set", "kv_delete"]);
    assert_eq!(
        text(call(&engine, &module, "increment", b"visits", &grant)),
        "1"
    );
    assert_eq!(
        text(call(&engine, &module, "increment", b"visits", &grant)),
        "2"
    );
    assert_eq!(text(call(&engine, &module, "get", b"visits", &grant)), "2");
    assert_eq!(text(call(&engine, &module, "get", b"other", &grant)), "0");
    use deadlift_engine::KvStore;
    assert_eq!(kv.get(TENANT, "visits").unwrap(), Some(b"2".to_vec()));
    call(&engine, &module, "reset", b"visits", &grant).unwrap();
    assert_eq!(kv.get(TENANT, "visits").unwrap(), None);
}

#[test]
fn emit_publishes_to_the_sink_with_the_tenant() {
    let sink = Arc::new(MemorySink::new());
    let engine = common::builder().events(sink.clone()).build().unwrap();
    let module = add(&engine, TENANT, "emitter");
    let grant = Grant::default().allow(["emit"]);
    let out = text(call(
        &engine,
        &module,
        "emit_event",
        br#"{"type":"payments.discount.sent","data":{"customer":"c1"}}"#,
        &grant,
    ));
    assert_eq!(out, r#"{"emitted":"payments.discount.sent"}"#);
    let events = sink.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, TENANT);
    assert_eq!(events[0].1.event_type, "payments.discount.sent");
    assert_eq!(events[0].1.data, serde_json::json!({"customer": "c1"}));
    assert!(call(&engine, &module, "emit_event", br#"{"data":1}"#, &grant).is_err());
}

/// A guest that emits `{"type":"a.b","data":1}` as many times as its input is long
/// (each event in a block of its own).
const EMITS: &str = r#"
(module
  (import "extism:host/env" "input_length" (func $length (result i64)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store (param i64 i32)))
  (import "extism:host/user" "emit" (func $emit (param i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{\22type\22:\22a.b\22,\22data\22:1}")
  (func (export "burst") (result i32)
    (local $left i64)
    (local $event i64)
    (local $at i32)
    (local.set $left (call $length))
    (block $done
      (loop $again
        (br_if $done (i64.eqz (local.get $left)))
        (local.set $event (call $alloc (i64.const 23)))
        (local.set $at (i32.const 0))
        (block $copied
          (loop $copy
            (br_if $copied (i32.eq (local.get $at) (i32.const 23)))
            (call $store
              (i64.add (local.get $event) (i64.extend_i32_u (local.get $at)))
              (i32.load8_u (local.get $at)))
            (local.set $at (i32.add (local.get $at) (i32.const 1)))
            (br $copy)))
        (call $emit (local.get $event))
        (local.set $left (i64.sub (local.get $left) (i64.const 1)))
        (br $again)))
    (i32.const 0)))
"#;

/// Issue 12 (its emit part): one call emitted 50,000 events, committed in one
/// transaction. A call may emit at most its grant's `max_emits` (and bytes).
#[test]
fn a_call_emits_at_most_what_its_grant_allows() {
    let engine = common::engine();
    let module = common::add_bytes(&engine, TENANT, "burst", common::wat(EMITS));
    let grant = Grant {
        max_emits: 5,
        ..Grant::default().allow(["emit"])
    };
    let buffer = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let ctx = common::ctx(TENANT).with_emit_buffer(buffer.clone());
    engine
        .call_blocking(&module, "burst", b"12345", &grant, &ctx)
        .unwrap();
    assert_eq!(buffer.lock().len(), 5);
    let over = engine.call_blocking(&module, "burst", b"123456", &grant, &ctx);
    match over {
        Err(CallError::HostFunction { name, message }) => {
            assert_eq!(name, "emit");
            assert!(message.contains("max_emits"), "{message}");
        }
        other => panic!("the sixth event must fail the call: {other:?}"),
    }
    // Bytes count too: 23 bytes an event.
    let by_bytes = Grant {
        max_emit_bytes: 50,
        ..Grant::default().allow(["emit"])
    };
    let fresh = common::ctx(TENANT).with_emit_buffer(Default::default());
    assert!(
        engine
            .call_blocking(&module, "burst", b"12", &by_bytes, &fresh)
            .is_ok()
    );
    assert!(
        engine
            .call_blocking(&module, "burst", b"123", &by_bytes, &fresh)
            .is_err()
    );
}
