//! Nothing leaks: not across a discarded instance, not across tenants, not across grants.

use deadlift_engine::{CallError, Grant};

use crate::common::{self, TENANT, add, add_bytes, call, ctx, text};

#[test]
fn a_trapped_instance_is_discarded_and_its_state_with_it() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "stateful_counter");
    let grant = Grant::default();
    assert_eq!(text(call(&engine, &module, "next", b"", &grant)), "1");
    assert_eq!(text(call(&engine, &module, "next", b"", &grant)), "2");
    let before = engine.stats().instances_discarded;
    assert!(matches!(
        call(&engine, &module, "trap_after_increment", b"", &grant),
        Err(CallError::Trap { .. })
    ));
    assert_eq!(engine.stats().instances_discarded, before + 1);
    assert_eq!(text(call(&engine, &module, "next", b"", &grant)), "1");
}

/// A guest holding its state in a global: `next` counts up and outputs the count as
/// one ASCII digit; `fail` counts up too, then reports an Extism error (code 1).
const COUNTING_GUEST: &str = r#"
(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "error_set" (func $error_set (param i64)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (func $bump (global.set $count (i32.add (global.get $count) (i32.const 1))))
  (func (export "next") (result i32)
    (local $at i64)
    (call $bump)
    (local.set $at (call $alloc (i64.const 1)))
    (call $store (local.get $at) (i32.add (i32.const 48) (global.get $count)))
    (call $output_set (local.get $at) (i64.const 1))
    (i32.const 0))
  (func (export "fail") (result i32)
    (local $at i64)
    (call $bump)
    (local.set $at (call $alloc (i64.const 1)))
    (call $store (local.get $at) (i32.const 33))
    (call $error_set (local.get $at))
    (i32.const 1)))
"#;

#[test]
fn guest_errors_keep_the_instance() {
    let engine = common::engine();
    let module = add_bytes(&engine, TENANT, "counting", common::wat(COUNTING_GUEST));
    let grant = Grant::default();
    assert_eq!(text(call(&engine, &module, "next", b"", &grant)), "1");
    let failed = call(&engine, &module, "fail", b"", &grant);
    assert!(
        matches!(failed, Err(CallError::Guest { code: 1, ref message }) if message == "!"),
        "{failed:?}"
    );
    // The failing call's increment is still there: the same instance served all three.
    assert_eq!(text(call(&engine, &module, "next", b"", &grant)), "3");
    assert_eq!(engine.stats().instances_created, 1);
}

#[test]
fn warm_instances_are_reused() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "add_ten");
    for n in 0..20 {
        call(
            &engine,
            &module,
            "_main",
            n.to_string().as_bytes(),
            &Grant::default(),
        )
        .unwrap();
    }
    assert_eq!(engine.stats().instances_created, 1);
    assert_eq!(engine.stats().idle_instances, 1);
}

#[test]
fn tenants_never_share_instances_or_kv() {
    let engine = common::engine();
    let grant = Grant::default().allow(["kv_get", "kv_set", "kv_delete"]);
    let counter = add(&engine, "a", "kv_counter");
    let counter_b = add(&engine, "b", "kv_counter");
    assert_eq!(counter, counter_b, "same bytes, same identity");
    let kv = |tenant: &str| {
        engine
            .call_blocking(&counter, "increment", b"k", &grant, &ctx(tenant))
            .map(|o| String::from_utf8(o.output).unwrap())
    };
    assert_eq!(kv("a").unwrap(), "1");
    assert_eq!(kv("a").unwrap(), "2");
    assert_eq!(kv("b").unwrap(), "1");

    let state = add(&engine, "a", "stateful_counter");
    add(&engine, "b", "stateful_counter");
    let next = |tenant: &str| {
        engine
            .call_blocking(&state, "next", b"", &Grant::default(), &ctx(tenant))
            .map(|o| String::from_utf8(o.output).unwrap())
    };
    assert_eq!(next("a").unwrap(), "1");
    assert_eq!(next("a").unwrap(), "2");
    assert_eq!(
        next("b").unwrap(),
        "1",
        "guest state must not cross tenants"
    );
}

#[test]
fn a_tenant_cannot_call_another_tenants_module() {
    let engine = common::engine();
    let module = add(&engine, "a", "add_ten");
    assert!(matches!(
        engine.call_blocking(&module, "_main", b"1", &Grant::default(), &ctx("b")),
        Err(CallError::ModuleNotFound { .. })
    ));
}

#[test]
fn deleted_modules_can_no_longer_be_called() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "add_ten");
    call(&engine, &module, "_main", b"1", &Grant::default()).unwrap();
    engine.delete_module(TENANT, &module).unwrap();
    assert!(matches!(
        call(&engine, &module, "_main", b"1", &Grant::default()),
        Err(CallError::ModuleNotFound { .. })
    ));
}

#[test]
fn different_grants_get_different_instances() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "stateful_counter");
    let small = Grant::default().with_memory_bytes(8 * 1024 * 1024);
    assert_eq!(
        text(call(&engine, &module, "next", b"", &Grant::default())),
        "1"
    );
    assert_eq!(text(call(&engine, &module, "next", b"", &small)), "1");
    assert_eq!(
        text(call(&engine, &module, "next", b"", &Grant::default())),
        "2"
    );
}

#[test]
fn a_full_instance_pool_evicts_idle_instances_instead_of_failing() {
    let engine = common::builder().max_instances(2).build().unwrap();
    let names = ["add_ten", "multiply_by_five", "echo", "count_vowels"];
    for round in 0..2 {
        for name in names {
            let module = add(&engine, TENANT, name);
            let function = match name {
                "echo" => "echo",
                "count_vowels" => "count_vowels",
                _ => "_main",
            };
            call(&engine, &module, function, b"3", &Grant::default())
                .unwrap_or_else(|e| panic!("round {round}, {name}: {e:?}"));
        }
    }
}

/// Issue 12: when the instance slots ran out, every warm instance everywhere was
/// dropped, the busiest ones too. Now the least recently used go first.
#[test]
fn a_full_instance_pool_evicts_the_least_recently_used_first() {
    let engine = common::builder().max_instances(4).build().unwrap();
    let echo = |name: &str| {
        let bytes = common::fixture("echo");
        // Distinct modules: the same guest under distinct tenants.
        let tenant = format!("tenant-{name}");
        let module = common::add_bytes(&engine, &tenant, "echo", bytes);
        (module, tenant)
    };
    let modules: Vec<_> = ["a", "b", "c", "d", "e"].iter().map(|n| echo(n)).collect();
    let run = |(module, tenant): &(deadlift_engine::ModuleId, String)| {
        engine
            .call_blocking(
                module,
                "echo",
                b"x",
                &Grant::default(),
                &common::ctx(tenant),
            )
            .unwrap();
    };
    for module in &modules[..4] {
        run(module);
    }
    run(&modules[0]);
    let created = engine.stats().instances_created;
    run(&modules[4]);
    assert_eq!(engine.stats().instances_created, created + 1);
    // `a` was used most recently before `e`: still warm.
    run(&modules[0]);
    assert_eq!(
        engine.stats().instances_created,
        created + 1,
        "a lost its warm instance"
    );
}
