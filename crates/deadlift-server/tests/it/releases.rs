//! Issue 15: versions behind a module name and safe rollouts, over real HTTP. An upload
//! does not change what serves a name; a canary takes its share of calls and is rolled
//! back by itself when it fails; promote and rollback by hand; every run says which
//! version served it, and a run's steps stay on one side; a shadow compares and changes
//! nothing; a tenant cannot touch another's releases.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::fixture;
use crate::common::server::TestAgent;

/// Uploads `bytes` as `name@version`.
async fn push(agent: &TestAgent, token: &str, name: &str, version: &str, bytes: Vec<u8>) -> Value {
    let response = agent
        .http
        .post(agent.url(&format!("/v1/modules?name={name}&version={version}")))
        .bearer_auth(token)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    response.json().await.unwrap()
}

async fn call(agent: &TestAgent, token: &str, module: &str, function: &str, input: &str) -> Value {
    agent
        .http
        .post(agent.url(&format!("/v1/modules/{module}/call/{function}")))
        .bearer_auth(token)
        .body(input.to_owned())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn post(agent: &TestAgent, token: &str, path: &str, body: Value) -> reqwest::Response {
    agent
        .http
        .post(agent.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn post_ok(agent: &TestAgent, token: &str, path: &str, body: Value) -> Value {
    let response = post(agent, token, path, body).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// A module that traps on every call of `_main`.
fn trapping() -> Vec<u8> {
    wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "_main") (result i32) unreachable))"#,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_takes_its_share_and_is_rolled_back_when_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let acme = agent.tenant_token("acme").await;
    let v1 = push(&agent, &acme, "scorer", "1", fixture("add_ten")).await;
    push(&agent, &acme, "scorer", "2", fixture("multiply_by_five")).await;

    // The second upload does not go live: the name still means version 1.
    let out = call(&agent, &acme, "scorer", "_main", "1").await;
    assert_eq!(
        (&out["output"], &out["version"]),
        (&json!(11), &json!("1")),
        "{out}"
    );
    assert_eq!(
        agent.get_json("/v1/modules/scorer", &acme).await["id"],
        v1["id"]
    );

    let started = post_ok(
        &agent,
        &acme,
        "/v1/modules/scorer/rollout",
        json!({"candidate": "2", "percent": 20}),
    )
    .await;
    assert_eq!(started["rollout"]["candidate"]["version"], "2", "{started}");
    assert_eq!(started["rollout"]["mode"], "canary");

    // 1,000 calls: about 200 to the canary (binomial, 5 standard deviations either
    // side), each answer saying who served it.
    let calls = 1000;
    let mut canary = 0;
    for _ in 0..calls {
        let out = call(&agent, &acme, "scorer", "_main", "1").await;
        match (out["canary"].as_bool(), out["output"].as_i64()) {
            (Some(true), Some(5)) => {
                assert_eq!(out["version"], "2");
                canary += 1;
            }
            (Some(false), Some(11)) => assert_eq!(out["version"], "1"),
            _ => panic!("unexpected answer {out}"),
        }
    }
    assert!(
        (137..=263).contains(&canary),
        "{canary} of {calls} calls went to a 20% canary"
    );
    let status = agent.get_json("/v1/modules/scorer/release", &acme).await;
    assert_eq!(status["window"]["candidate_calls"], canary, "{status}");
    assert_eq!(status["window"]["live_calls"], calls - canary, "{status}");
    assert_eq!(status["window"]["candidate_errors"], 0);

    // A second rollout waits for this one to end.
    let busy = post(
        &agent,
        &acme,
        "/v1/modules/scorer/rollout",
        json!({"candidate": "2"}),
    )
    .await;
    TestAgent::expect_error(busy, 409, "rollout_conflict").await;
    let ended = post_ok(&agent, &acme, "/v1/modules/scorer/rollback", json!({})).await;
    assert!(ended["rollout"].is_null(), "{ended}");
    assert_eq!(ended["history"][0]["action"], "rolled_back");

    // A version that traps, as a half-share canary judged after 10 calls: the 10th
    // failing call rolls it back, and every call after goes to the live version.
    push(&agent, &acme, "scorer", "3", trapping()).await;
    post_ok(
        &agent,
        &acme,
        "/v1/modules/scorer/rollout",
        json!({"candidate": "scorer@3", "percent": 50, "min_calls": 10, "window_s": 60}),
    )
    .await;
    let mut failed = 0;
    for _ in 0..200 {
        let out = call(&agent, &acme, "scorer", "_main", "1").await;
        if out["error"]["code"] == "trap" {
            failed += 1;
        }
    }
    assert_eq!(failed, 10, "the canary served exactly its judged calls");
    let status = agent.get_json("/v1/modules/scorer/release", &acme).await;
    assert!(status["rollout"].is_null(), "{status}");
    assert_eq!(status["live"]["version"], "1");
    let last = &status["history"][0];
    assert_eq!(last["action"], "auto_rolled_back", "{status}");
    assert_eq!(last["version"], "3");
    assert!(
        last["detail"].as_str().unwrap().contains("10 of 10 calls"),
        "{last}"
    );

    // The automatic rollback was written down: it holds after a restart.
    agent.stop().await;
    let agent = TestAgent::start(dir.path()).await;
    let status = agent.get_json("/v1/modules/scorer/release", &acme).await;
    assert!(status["rollout"].is_null(), "{status}");
    assert_eq!(status["history"][0]["action"], "auto_rolled_back");
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_record_the_version_that_served_them_and_promote_and_rollback_move_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let acme = agent.tenant_token("acme").await;
    push(&agent, &acme, "scorer", "1", fixture("add_ten")).await;
    push(&agent, &acme, "scorer", "2", fixture("multiply_by_five")).await;
    let applied = agent
        .http
        .put(agent.url("/v1/workflows/twice"))
        .bearer_auth(&acme)
        .header("content-type", "application/toml")
        .body(
            r#"
            [[steps]]
            id = "first"
            call = "scorer"
            [[steps]]
            id = "second"
            call = "scorer"
            "#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        applied.status().as_u16(),
        200,
        "{}",
        applied.text().await.unwrap()
    );
    let run = |input: i64| {
        let (agent, acme) = (&agent, &acme);
        async move {
            agent
                .http
                .post(agent.url("/v1/workflows/twice/runs?wait=true"))
                .bearer_auth(acme)
                .json(&json!(input))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let first = run(1).await;
    assert_eq!(first["output"], 21, "{first}");
    for step in first["steps"].as_array().unwrap() {
        assert_eq!(
            (&step["version"], &step["canary"]),
            (&json!("1"), &Value::Null)
        );
    }

    // A half-share canary: each run's two steps are served by the same side.
    post_ok(
        &agent,
        &acme,
        "/v1/modules/scorer/rollout",
        json!({"candidate": "2", "percent": 50}),
    )
    .await;
    let mut sides = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let run = run(1).await;
        let steps = run["steps"].as_array().unwrap();
        let canary = steps[0]["canary"] == true;
        assert_eq!(steps[1]["canary"] == true, canary, "{run}");
        assert_eq!(run["output"], if canary { 25 } else { 21 }, "{run}");
        assert_eq!(steps[0]["version"], if canary { "2" } else { "1" });
        sides.insert(canary);
    }
    assert_eq!(sides.len(), 2, "30 runs at 50% all took one side");

    // Promote by hand: version 2 serves every run; rollback goes back to 1.
    let promoted = post_ok(&agent, &acme, "/v1/modules/scorer/promote", json!({})).await;
    assert_eq!(promoted["live"]["version"], "2", "{promoted}");
    assert_eq!(promoted["previous"]["version"], "1");
    assert_eq!(run(1).await["output"], 25);
    let reverted = post_ok(&agent, &acme, "/v1/modules/scorer/rollback", json!({})).await;
    assert_eq!(reverted["live"]["version"], "1", "{reverted}");
    assert_eq!(reverted["history"][0]["action"], "reverted");
    assert_eq!(run(1).await["output"], 21);
    let nothing = post(&agent, &acme, "/v1/modules/scorer/rollback", json!({})).await;
    TestAgent::expect_error(nothing, 409, "rollout_conflict").await;

    // A version that lacks the function the workflow calls cannot serve the name.
    push(
        &agent,
        &acme,
        "scorer",
        "3",
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "other") (result i32) i32.const 0))"#)
            .unwrap(),
    )
    .await;
    let lacking = post(
        &agent,
        &acme,
        "/v1/modules/scorer/promote",
        json!({"version": "3"}),
    )
    .await;
    let message = TestAgent::expect_error(lacking, 409, "module_incompatible").await;
    assert!(
        message.contains("workflow `twice` step `first`"),
        "{message}"
    );
    let lacking = post(
        &agent,
        &acme,
        "/v1/modules/scorer/rollout",
        json!({"candidate": "3"}),
    )
    .await;
    TestAgent::expect_error(lacking, 409, "module_incompatible").await;

    // The live version cannot be deleted while others could take its place silently.
    let delete = agent
        .http
        .delete(agent.url("/v1/modules/scorer@1"))
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(delete, 409, "module_in_use").await;
    let delete = agent
        .http
        .delete(agent.url("/v1/modules/scorer@2"))
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status().as_u16(), 204);
    let status = agent.get_json("/v1/modules/scorer/release", &acme).await;
    assert!(status["previous"].is_null(), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_compares_on_live_calls_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| {
        b.default_grant(
            deadlift_engine::Grant::default()
                .allow(["kv_get", "kv_set", "kv_delete"])
                .with_timeout(Duration::from_secs(2)),
        )
    })
    .await;
    let acme = agent.tenant_token("acme").await;

    // A candidate with other outputs: each shadowed call is `changed`, both shown.
    push(&agent, &acme, "scorer", "1", fixture("add_ten")).await;
    push(&agent, &acme, "scorer", "2", fixture("multiply_by_five")).await;
    post_ok(
        &agent,
        &acme,
        "/v1/modules/scorer/rollout",
        json!({"candidate": "2", "mode": "shadow"}),
    )
    .await;
    for _ in 0..3 {
        let out = call(&agent, &acme, "scorer", "_main", "1").await;
        assert_eq!(
            (&out["output"], &out["canary"]),
            (&json!(11), &json!(false)),
            "{out}"
        );
    }
    let shadow = shadow_after(&agent, &acme, "scorer", 3).await;
    assert_eq!(shadow["changed"], 3, "{shadow}");
    let example = &shadow["examples"][0];
    assert_eq!(
        (&example["live"]["output"], &example["candidate"]["output"]),
        (&json!(11), &json!(5))
    );
    assert_eq!(example["input"], 1);

    // A candidate that deletes the key the live version counts: the delete is a host
    // call the tape lacks, so it diverges and does not run; the count stands.
    push(&agent, &acme, "counter", "1", fixture("kv_counter")).await;
    let eraser = wat::parse_str(
        r#"(module
            (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
            (import "extism:host/user" "kv_delete" (func $kv_delete (param i64)))
            (memory (export "memory") 1)
            (func (export "increment") (result i32)
              (call $kv_delete (call $alloc (i64.const 1)))
              (i32.const 0)))"#,
    )
    .unwrap();
    push(&agent, &acme, "counter", "2", eraser).await;
    post_ok(
        &agent,
        &acme,
        "/v1/modules/counter/rollout",
        json!({"candidate": "2", "mode": "shadow"}),
    )
    .await;
    for expected in 1..=4 {
        let out = call(&agent, &acme, "counter", "increment", "visits").await;
        assert_eq!(out["output"], expected, "{out}");
    }
    let shadow = shadow_after(&agent, &acme, "counter", 4).await;
    assert_eq!(shadow["diverged"], 4, "{shadow}");
    assert_eq!(agent.get_json("/v1/kv/visits", &acme).await, json!(4));
}

/// The shadow's counts once `compared` calls are compared (they run in the background).
async fn shadow_after(agent: &TestAgent, token: &str, name: &str, compared: u64) -> Value {
    let mut status = Value::Null;
    for _ in 0..200 {
        status = agent
            .get_json(&format!("/v1/modules/{name}/release"), token)
            .await;
        if status["shadow"]["compared"] == compared {
            return status["shadow"].clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never {compared} comparisons: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_cannot_see_or_move_another_tenants_release() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let acme = agent.tenant_token("acme").await;
    let mallory = agent.tenant_token("mallory").await;
    push(&agent, &acme, "scorer", "1", fixture("add_ten")).await;
    let acme_v2 = push(&agent, &acme, "scorer", "2", fixture("multiply_by_five")).await;

    let seen = agent
        .http
        .get(agent.url("/v1/modules/scorer/release"))
        .bearer_auth(&mallory)
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(seen, 404, "module_not_found").await;
    for path in ["rollout", "promote", "rollback"] {
        let body = json!({"candidate": "2"});
        let body = if path == "rollout" { body } else { json!({}) };
        let moved = post(
            &agent,
            &mallory,
            &format!("/v1/modules/scorer/{path}"),
            body,
        )
        .await;
        TestAgent::expect_error(moved, 404, "module_not_found").await;
    }

    // Its own name of the same spelling, and Acme's module id as the candidate: the
    // id is not Mallory's module.
    push(&agent, &mallory, "scorer", "1", fixture("echo")).await;
    let stolen = post(
        &agent,
        &mallory,
        "/v1/modules/scorer/rollout",
        json!({"candidate": acme_v2["id"]}),
    )
    .await;
    TestAgent::expect_error(stolen, 404, "module_not_found").await;
    // Another of its own names is not a version of this one.
    push(&agent, &mallory, "other", "1", fixture("add_ten")).await;
    let renamed = post(
        &agent,
        &mallory,
        "/v1/modules/scorer/rollout",
        json!({"candidate": "other@1"}),
    )
    .await;
    TestAgent::expect_error(renamed, 400, "rollout_invalid").await;
    let status = agent.get_json("/v1/modules/scorer/release", &acme).await;
    assert_eq!(status["live"]["version"], "1");
    assert!(status["rollout"].is_null());
}

/// Each rollout holds counters (and, in shadow, examples) in memory: a tenant has at most
/// 16 in progress, and one that ends writes what it did into the history.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_has_at_most_16_rollouts_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let acme = agent.tenant_token("acme").await;
    let constant = |n: u32| {
        wat::parse_str(format!(
            r#"(module (memory (export "memory") 1) (func (export "_main") (result i32) i32.const {n}))"#
        ))
        .unwrap()
    };
    for n in 0..17 {
        let name = format!("m{n}");
        push(&agent, &acme, &name, "1", constant(2 * n)).await;
        push(&agent, &acme, &name, "2", constant(2 * n + 1)).await;
        let started = post(
            &agent,
            &acme,
            &format!("/v1/modules/{name}/rollout"),
            json!({"candidate": "2", "mode": if n % 2 == 0 { "canary" } else { "shadow" }}),
        )
        .await;
        if n < 16 {
            assert_eq!(
                started.status().as_u16(),
                200,
                "{}",
                started.text().await.unwrap()
            );
        } else {
            let message = TestAgent::expect_error(started, 409, "rollout_conflict").await;
            assert!(message.contains("16 rollouts"), "{message}");
        }
    }
    // Another tenant is not counted against Acme's.
    let globex = agent.tenant_token("globex").await;
    push(&agent, &globex, "m0", "1", constant(100)).await;
    push(&agent, &globex, "m0", "2", constant(101)).await;
    post_ok(
        &agent,
        &globex,
        "/v1/modules/m0/rollout",
        json!({"candidate": "2"}),
    )
    .await;
    // One ends, with what it did; then there is room again.
    let ended = post_ok(&agent, &acme, "/v1/modules/m1/rollback", json!({})).await;
    let detail = ended["history"][0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("the shadow compared 0 calls"),
        "{detail}"
    );
    post_ok(
        &agent,
        &acme,
        "/v1/modules/m16/rollout",
        json!({"candidate": "2"}),
    )
    .await;
}
