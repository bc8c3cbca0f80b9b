//! Issue 15: tapes recorded by direct calls, replayed through a candidate module over
//! HTTP: identical, changed (with both outputs and a diff), diverged; nothing the host
//! did happens again; a tenant replays only its own tapes.

use serde_json::{Value, json};

use crate::common::fixture;
use crate::common::server::TestAgent;

async fn push(agent: &TestAgent, token: &str, name: &str, bytes: Vec<u8>) {
    let pushed = agent
        .http
        .post(agent.url(&format!("/v1/modules?name={name}")))
        .bearer_auth(token)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert!(
        pushed.status().is_success(),
        "{}",
        pushed.text().await.unwrap()
    );
}

async fn call(agent: &TestAgent, token: &str, module: &str, function: &str, input: &str) -> Value {
    let grant_hosts = agent
        .http
        .post(agent.url(&format!("/v1/modules/{module}/call/{function}")))
        .bearer_auth(token)
        .body(input.to_owned())
        .send()
        .await
        .unwrap();
    grant_hosts.json().await.unwrap()
}

/// Replays until `expected` tapes are there (they are written in the background).
async fn replay(
    agent: &TestAgent,
    token: &str,
    candidate: &str,
    against: &str,
    expected: u64,
) -> Value {
    let mut report = Value::Null;
    for _ in 0..100 {
        report = agent
            .http
            .post(agent.url(&format!("/v1/modules/{candidate}/replay?against={against}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if report["total"] == expected {
            return report;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never {expected} tapes: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn recorded_calls_replay_through_a_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| {
        b.default_grant(
            deadlift_engine::Grant::default()
                .allow(["kv_get", "kv_set", "kv_delete"])
                .with_timeout(std::time::Duration::from_secs(2)),
        )
    })
    .await;
    let acme = agent.tenant_token("acme").await;
    push(&agent, &acme, "counter", fixture("kv_counter")).await;
    for expected in [1, 2, 3] {
        let out = call(&agent, &acme, "counter", "increment", "visits").await;
        assert_eq!(out["output"], expected, "{out}");
    }

    // The same bytes: every call identical; the counter the replays read is the tape's,
    // and the live one is not written.
    let same = replay(&agent, &acme, "counter", "counter", 3).await;
    assert_eq!(
        (same["identical"].as_u64(), same["changed"].as_u64()),
        (Some(3), Some(0)),
        "{same}"
    );
    // The cost totals cover the calls that succeeded both times.
    assert_eq!(same["totals"]["calls"], 3, "{same}");
    assert!(same["totals"]["duration_us_replayed"].as_u64().unwrap() > 0);
    let stored = agent.get_json("/v1/kv/visits", &acme).await;
    assert_eq!(stored, json!(3));

    // Another plug-in against the same tapes: all changed, both outputs shown.
    push(&agent, &acme, "adder", fixture("add_ten")).await;
    call(&agent, &acme, "adder", "_main", "1").await;
    call(&agent, &acme, "adder", "_main", "2").await;
    push(&agent, &acme, "times-five", fixture("multiply_by_five")).await;
    let changed = replay(&agent, &acme, "times-five", "adder", 2).await;
    assert_eq!(changed["changed"], 2, "{changed}");
    let first = &changed["calls"][0];
    assert_eq!(first["verdict"], "changed");
    assert_eq!(first["recorded"]["output"], 11);
    assert_eq!(first["replayed"]["output"], 5);
    assert_eq!(first["diff"][0]["path"], "/");

    // A candidate that makes a host call the tapes lack: diverged, not run.
    let delete_first = wat::parse_str(
        r#"(module
            (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
            (import "extism:host/user" "kv_delete" (func $kv_delete (param i64)))
            (memory (export "memory") 1)
            (func (export "increment") (result i32)
              (call $kv_delete (call $alloc (i64.const 1)))
              (i32.const 0)))"#,
    )
    .unwrap();
    push(&agent, &acme, "eraser", delete_first).await;
    let diverged = replay(&agent, &acme, "eraser", "counter", 3).await;
    assert_eq!(diverged["diverged"], 3, "{diverged}");
    assert_eq!(
        diverged["calls"][0]["replayed"]["error"]["code"],
        "replay_diverged"
    );
    let still = agent.get_json("/v1/kv/visits", &acme).await;
    assert_eq!(still, json!(3), "the diverging kv_delete did not run");

    // Another tenant sees none of Acme's tapes, and cannot use Acme's module.
    let globex = agent.tenant_token("globex").await;
    push(&agent, &globex, "counter", fixture("kv_counter")).await;
    let theirs = replay(&agent, &globex, "counter", "counter", 0).await;
    assert_eq!(theirs["calls"], json!([]));
    let refused = agent
        .http
        .post(agent.url("/v1/modules/times-five/replay?against=adder"))
        .bearer_auth(&globex)
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(refused, 404, "module_not_found").await;
    agent.stop().await;
}

/// Issue 15: a workflow step's call is recorded as the module's tape too.
#[tokio::test(flavor = "multi_thread")]
async fn workflow_steps_are_recorded_too() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let acme = agent.tenant_token("acme").await;
    push(&agent, &acme, "counter", fixture("kv_counter")).await;
    let applied = agent
        .http
        .put(agent.url("/v1/workflows/count"))
        .bearer_auth(&acme)
        .header("content-type", "application/toml")
        .body(
            "[[steps]]\nid = \"count\"\ncall = \"counter\"\nfunction = \"increment\"\n\
             input = \"'visits'\"\ngrant = { host_functions = [\"kv_get\", \"kv_set\", \"kv_delete\"] }\n",
        )
        .send()
        .await
        .unwrap();
    assert!(
        applied.status().is_success(),
        "{}",
        applied.text().await.unwrap()
    );
    let run: Value = agent
        .http
        .post(agent.url("/v1/workflows/count/runs?wait=true"))
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    let report = replay(&agent, &acme, "counter", "counter", 1).await;
    assert_eq!(report["identical"], 1, "{report}");
    assert_eq!(report["calls"][0]["function"], "increment");
    agent.stop().await;
}

/// Issue 15: a replay starts where the recorded call started. Its fresh instance holds
/// the vars the live instance held (a count kept in vars replays identical), and the
/// recorded config applies under the candidate's own (a candidate with no manifest reads
/// the greeting the live call read).
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_starts_with_the_recorded_vars_and_config() {
    let dir = tempfile::tempdir().unwrap();
    // One worker: every call meets the same warm instance, and its vars.
    let agent = TestAgent::start_with(dir.path(), |b| b.workers(1)).await;
    let acme = agent.tenant_token("acme").await;
    push(&agent, &acme, "greeter", fixture("vars_config")).await;
    let manifest = agent
        .http
        .put(agent.url("/v1/modules/greeter/manifest"))
        .bearer_auth(&acme)
        .json(&json!({"config": {"greeting": "Hi"}}))
        .send()
        .await
        .unwrap();
    assert!(manifest.status().is_success());
    for _ in 0..2 {
        let out = call(&agent, &acme, "greeter", "greet", "Ada").await;
        assert_eq!(out["output_text"], "Hi, Ada!", "{out}");
    }
    let out = call(&agent, &acme, "greeter", "get_count", "").await;
    assert_eq!(out["output"], 2, "{out}");

    let same = replay(&agent, &acme, "greeter", "greeter", 3).await;
    assert_eq!(same["identical"], 3, "{same}");
    let counted = same["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["function"] == "get_count")
        .unwrap();
    assert_eq!(counted["replayed"]["output"], 2, "{counted}");

    // A candidate with no manifest that outputs its config `greeting`: it reads the
    // greeting the live call read...
    let echo_greeting = wat::parse_str(
        r#"(module
            (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
            (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
            (import "extism:host/env" "config_get" (func $config_get (param i64) (result i64)))
            (import "extism:host/env" "length" (func $length (param i64) (result i64)))
            (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
            (memory (export "memory") 1)
            (func (export "greet") (result i32)
              (local $key i64) (local $value i64)
              (local.set $key (call $alloc (i64.const 8)))
              ;; "greeting", little-endian
              (call $store_u64 (local.get $key) (i64.const 0x676e697465657267))
              (local.set $value (call $config_get (local.get $key)))
              (call $output_set (local.get $value) (call $length (local.get $value)))
              (i32.const 0)))"#,
    )
    .unwrap();
    push(&agent, &acme, "echo-greeting", echo_greeting).await;
    let replayed = |body: Value| {
        let (agent, acme) = (&agent, &acme);
        async move {
            agent
                .http
                .post(agent.url("/v1/modules/echo-greeting/replay?against=greeter&function=greet"))
                .bearer_auth(acme)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let recorded = replayed(json!({})).await;
    assert_eq!(recorded["total"], 2, "{recorded}");
    assert_eq!(
        recorded["calls"][0]["replayed"]["output"], "Hi",
        "{recorded}"
    );
    // ...and a config given to the replay goes over the recorded one.
    let given = replayed(json!({"config": {"greeting": "Howdy"}})).await;
    assert_eq!(given["calls"][0]["replayed"]["output"], "Howdy", "{given}");
    agent.stop().await;
}
