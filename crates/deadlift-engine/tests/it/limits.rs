//! Every limit trips with its own typed error, and the engine keeps serving.

use std::time::Duration;

use deadlift_engine::{CallError, CancelToken, Grant};

use crate::common::{self, TENANT, add, call, ctx, text};

/// After any failure the engine must still answer an ordinary call.
fn still_serving(engine: &deadlift_engine::Engine) {
    let module = add(engine, TENANT, "add_ten");
    assert_eq!(
        text(call(engine, &module, "_main", b"1", &Grant::default())),
        "11"
    );
}

#[test]
fn an_endless_loop_times_out() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "looper");
    let grant = Grant::default().with_timeout(Duration::from_millis(100));
    assert_eq!(
        call(&engine, &module, "loop_forever", b"", &grant).unwrap_err(),
        CallError::Timeout {
            limit: Duration::from_millis(100)
        }
    );
    still_serving(&engine);
}

#[test]
fn fuel_runs_out_and_use_is_reported() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "looper");
    let tight = Grant::default().with_fuel(50_000);
    assert_eq!(
        call(&engine, &module, "spin", b"100000000", &tight).unwrap_err(),
        CallError::FuelExhausted { budget: 50_000 }
    );
    let enough = Grant::default().with_fuel(100_000_000);
    let out = call(&engine, &module, "spin", b"1000", &enough).unwrap();
    assert!(out.fuel_used > 1000, "fuel used: {}", out.fuel_used);
    assert!(out.fuel_used < 100_000_000);
    // Fuel is refilled per call: the same budget suffices again.
    call(&engine, &module, "spin", b"1000", &enough).unwrap();
    still_serving(&engine);
}

#[test]
fn unbounded_allocation_hits_the_memory_budget() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "allocator");
    let grant = Grant::default().with_memory_bytes(8 * 1024 * 1024);
    assert_eq!(
        call(&engine, &module, "alloc_forever", b"", &grant).unwrap_err(),
        CallError::MemoryLimit {
            limit_bytes: 8 * 1024 * 1024
        }
    );
    assert_eq!(text(call(&engine, &module, "alloc_mib", b"2", &grant)), "2");
    still_serving(&engine);
}

#[test]
fn extism_memory_counts_against_the_budget() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "echo");
    let grant = Grant::default()
        .with_memory_bytes(4 * 1024 * 1024)
        .with_max_input_bytes(64 * 1024 * 1024);
    let input = vec![1u8; 8 * 1024 * 1024];
    assert!(matches!(
        call(&engine, &module, "echo", &input, &grant),
        Err(CallError::MemoryLimit { .. })
    ));
}

#[test]
fn a_memory_budget_too_small_to_start_fails_cleanly() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "add_ten");
    let grant = Grant::default().with_memory_bytes(64 * 1024);
    assert!(matches!(
        call(&engine, &module, "_main", b"1", &grant),
        Err(CallError::MemoryLimit { .. })
    ));
}

#[test]
fn a_grant_over_the_engine_maximum_is_invalid() {
    let engine = common::builder()
        .max_memory_bytes(32 * 1024 * 1024)
        .build()
        .unwrap();
    let module = add(&engine, TENANT, "add_ten");
    let grant = Grant::default().with_memory_bytes(1 << 30);
    assert_eq!(
        call(&engine, &module, "_main", b"1", &grant)
            .unwrap_err()
            .code()
            .as_str(),
        "grant_invalid"
    );
}

#[test]
fn input_and_output_sizes_are_capped() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "echo");
    let grant = Grant::default()
        .with_max_input_bytes(10)
        .with_max_output_bytes(4);
    assert_eq!(
        call(&engine, &module, "echo", &[0; 11], &grant).unwrap_err(),
        CallError::InputTooLarge {
            size: 11,
            limit: 10
        }
    );
    assert_eq!(
        call(&engine, &module, "echo", &[0; 5], &grant).unwrap_err(),
        CallError::OutputTooLarge { size: 5, limit: 4 }
    );
    assert_eq!(
        call(&engine, &module, "echo", b"1234", &grant)
            .unwrap()
            .output,
        b"1234"
    );
}

#[test]
fn cancelling_stops_only_that_call() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "looper");
    let grant = Grant::default().with_timeout(Duration::from_secs(60));
    let token = CancelToken::new();
    let looping = {
        let (engine, grant, ctx) = (
            engine.clone(),
            grant.clone(),
            ctx(TENANT).with_cancel(token.clone()),
        );
        std::thread::spawn(move || engine.call_blocking(&module, "loop_forever", b"", &grant, &ctx))
    };
    // While it loops, the same module keeps answering other calls.
    for _ in 0..20 {
        assert!(!text(call(&engine, &module, "spin", b"1000", &grant)).is_empty());
    }
    assert!(!looping.is_finished());
    token.cancel();
    assert_eq!(looping.join().unwrap().unwrap_err(), CallError::Cancelled);
}

/// Regression for the SDK's flaw (`docs/extism-abi.md`, "Measured SDK facts"): a timeout that bumps the shared
/// engine's epoch interrupts sibling instances. Ours must not.
#[test]
fn one_calls_timeout_never_interrupts_another_call() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "looper");
    let token = CancelToken::new();
    let long = {
        let grant = Grant::default().with_timeout(Duration::from_secs(60));
        let (engine, ctx) = (engine.clone(), ctx(TENANT).with_cancel(token.clone()));
        std::thread::spawn(move || engine.call_blocking(&module, "loop_forever", b"", &grant, &ctx))
    };
    let short = Grant::default().with_timeout(Duration::from_millis(50));
    for _ in 0..3 {
        assert!(matches!(
            call(&engine, &module, "loop_forever", b"", &short),
            Err(CallError::Timeout { .. })
        ));
    }
    assert!(
        !long.is_finished(),
        "a sibling's timeout interrupted the long call"
    );
    token.cancel();
    assert_eq!(long.join().unwrap().unwrap_err(), CallError::Cancelled);
}

#[tokio::test]
async fn dropping_an_async_call_cancels_it() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "looper");
    let grant = Grant::default().with_timeout(Duration::from_secs(60));
    let token = CancelToken::new();
    let looping_ctx = ctx(TENANT).with_cancel(token.clone());
    let call = engine.call(&module, "loop_forever", b"", &grant, &looping_ctx);
    let timed = tokio::time::timeout(Duration::from_millis(100), call).await;
    assert!(timed.is_err(), "an endless loop cannot finish");
    assert!(token.is_cancelled());
    // The worker is free again: a fresh call completes.
    let add_ten = add(&engine, TENANT, "add_ten");
    let out = engine
        .call(&add_ten, "_main", b"2", &Grant::default(), &ctx(TENANT))
        .await
        .unwrap();
    assert_eq!(out.output, b"12");
}

/// Issue 12: vars live on the host heap and were not charged (six runs with a large
/// var budget kept +1.2 GB). Their growth now counts against the instance's memory
/// budget, whatever the var cap says.
#[test]
fn vars_are_charged_to_the_memory_budget() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "vars_config");
    let grant = Grant::default()
        .with_memory_bytes(3 * 1024 * 1024)
        .with_max_var_bytes(64 * 1024 * 1024)
        .with_max_input_bytes(1 << 20);
    let mut failure = None;
    for n in 0..12 {
        let mut input = format!("key{n}=").into_bytes();
        input.resize(512 * 1024, b'v');
        if let Err(error) = call(&engine, &module, "set_var", &input, &grant) {
            failure = Some((n, error));
            break;
        }
    }
    let (n, error) = failure.expect("6 MiB of vars fit a 3 MiB budget");
    assert!(matches!(error, CallError::MemoryLimit { .. }), "{error:?}");
    assert!(n >= 2, "failed after {n} vars");
    still_serving(&engine);
}

/// Issue 12: fuel metering was always on and cost guests about a third of their speed,
/// so `count_vowels` ran at 0.8× the SDK. A call whose grant sets no fuel now runs
/// unmetered; the metered code is compiled the first time a grant with fuel needs it.
#[test]
fn only_grants_with_fuel_pay_for_metering() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "looper");
    assert_eq!(engine.stats().compiled, 1);
    let plain = call(&engine, &module, "spin", b"1000", &Grant::default()).unwrap();
    assert_eq!(plain.fuel_used, 0);
    assert_eq!(engine.stats().compiled, 1);
    let metered = Grant::default().with_fuel(10_000_000);
    let out = call(&engine, &module, "spin", b"1000", &metered).unwrap();
    assert!(out.fuel_used > 1000, "{}", out.fuel_used);
    assert_eq!(
        engine.stats().compiled,
        2,
        "the metered code is compiled once"
    );
    call(&engine, &module, "spin", b"1000", &metered).unwrap();
    assert_eq!(engine.stats().compiled, 2);
}
