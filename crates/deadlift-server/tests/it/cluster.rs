//! Issue 13 (its first part): agents in a cluster on a real nats-server with JetStream.
//! A tenant, token, module and workflow made on one agent are there on the others;
//! events posted to any agent, duplicates sent to another agent included, are stored once
//! by the cluster's stream and each runs exactly once on one of the agents; a message on
//! a NATS core subject starts the v1 workflow whose first module has that subject.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::fixture;
use crate::common::nats::NatsServer;
use crate::common::server::TestAgent;
use deadlift_agent::cluster::ClusterConfig;

/// A data directory holding the cluster's identity key: every agent of a cluster has the
/// same name and key (the first to join names them).
fn agent_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("identity.key"),
        "5d2e8f0c4b6a19371d0e2f4a6c8b0d1e3f5a7c9b1d3e5f7a9c0b2d4e6f8a1c3e",
    )
    .unwrap();
    dir
}

async fn joined(dir: &std::path::Path, nats: &NatsServer) -> TestAgent {
    let agent = TestAgent::start(dir).await;
    join(&agent, nats).await;
    agent
}

async fn join(agent: &TestAgent, nats: &NatsServer) {
    agent
        .agent
        .join_cluster(&ClusterConfig {
            urls: vec![nats.url.clone()],
            ..ClusterConfig::default()
        })
        .await
        .expect("the agent joins the cluster");
}

/// The two v1 modules of the original's example pipeline, uploaded through the v1 API.
async fn upload_v1_modules(agent: &TestAgent) {
    for (bytes, subject) in [
        (fixture("add_ten"), "shop.orders.ingest"),
        (fixture("multiply_by_five"), "shop.orders.score"),
    ] {
        let form = reqwest::multipart::Form::new()
            .part(
                "binary",
                reqwest::multipart::Part::bytes(bytes).file_name("m.wasm"),
            )
            .text("title", subject)
            .text("subject", subject);
        let uploaded = agent
            .http
            .post(agent.url("/api/v1/modules"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(
            uploaded.status().as_u16(),
            201,
            "{}",
            uploaded.text().await.unwrap()
        );
    }
}

/// Acme's module and workflow, made on one agent.
async fn configure(agent: &TestAgent, token: &str) {
    let pushed = agent
        .http
        .post(agent.url("/v1/modules?name=adder"))
        .bearer_auth(token)
        .body(fixture("add_ten"))
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success());
    let applied = agent
        .http
        .put(agent.url("/v1/workflows/orders"))
        .bearer_auth(token)
        .header("content-type", "application/toml")
        .body(
            "trigger = { event = \"orders.created\" }\n[[steps]]\nid = \"add\"\ncall = \"adder\"\n",
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
}

/// Waits (10 s at most) until `done` holds.
async fn until<F, Fut>(done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the cluster never got there");
}

async fn post_event(agent: &TestAgent, token: &str, id: &str, data: i64) -> Value {
    let response = agent
        .http
        .post(agent.url("/v1/events"))
        .bearer_auth(token)
        .header("content-type", "application/cloudevents+json")
        .json(&json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "orders.created", "data": data}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    response.json().await.unwrap()
}

/// Every run of workflow `orders` on `agent`, by its event id.
async fn runs_by_event(agent: &TestAgent, token: &str) -> Vec<(String, Value)> {
    let page = agent
        .get_json("/v1/runs?workflow=orders&limit=500", token)
        .await;
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| (run["event_id"].as_str().unwrap().to_owned(), run.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_posted_to_any_agent_run_exactly_once_in_the_cluster() {
    let nats = NatsServer::start();
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let a = joined(dir_a.path(), &nats).await;
    let b = joined(dir_b.path(), &nats).await;
    // Made on agent a only: the tenant, its token, the module and the workflow reach b.
    let token = a.tenant_token("acme").await;
    configure(&a, &token).await;
    let (token_a, token_b) = (token.clone(), token);

    // An event larger than the NATS servers take is the caller's to shrink (413), not a
    // cluster failure.
    let big = a
        .http
        .post(a.url("/v1/events"))
        .bearer_auth(&token_a)
        .header("content-type", "application/cloudevents+json")
        .json(&json!({"specversion": "1.0", "id": "big", "source": "/shop", "type": "orders.created", "data": "x".repeat(2 << 20)}))
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(big, 413, "payload_too_large").await;

    // At once, before b may have the workflow: 120 events to a. The agent that journals
    // one first applies the settings a had when it stored the event (read your writes),
    // so b runs its share too.
    let events = 120;
    for n in 0..events {
        let answer = post_event(&a, &token_a, &format!("order-{n}"), n).await;
        assert_eq!(answer["events"][0]["duplicate"], false, "{answer}");
        assert_eq!(answer["events"][0]["clustered"], true, "{answer}");
    }
    // Every fourth again, to b once it knows the token: the stream recognises it.
    until(|| async {
        b.http
            .get(b.url("/v1/whoami"))
            .bearer_auth(&token_b)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    })
    .await;
    for n in (0..events).step_by(4) {
        let again = post_event(&b, &token_b, &format!("order-{n}"), n).await;
        assert_eq!(again["events"][0]["duplicate"], true, "{again}");
    }

    // Each event runs once, on one agent or the other, and every agent shows every
    // run (the cluster's history): by run id, the same runs on both.
    let mut listed = Vec::new();
    for (agent, token) in [(&a, &token_a), (&b, &token_b)] {
        let mut runs = Vec::new();
        for _ in 0..300 {
            runs = runs_by_event(agent, token).await;
            if runs.len() >= events as usize && runs.iter().all(|(_, r)| r["status"] == "succeeded")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let by_event: BTreeMap<&String, usize> =
            runs.iter().fold(BTreeMap::new(), |mut counts, (event, _)| {
                *counts.entry(event).or_default() += 1;
                counts
            });
        assert_eq!(by_event.len(), events as usize, "every event ran");
        let doubled: Vec<_> = by_event.iter().filter(|(_, n)| **n > 1).collect();
        assert!(doubled.is_empty(), "events that ran twice: {doubled:?}");
        assert!(runs.iter().all(|(_, run)| run["status"] == "succeeded"));
        let mut ids: Vec<String> = runs
            .iter()
            .map(|(_, r)| r["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        listed.push(ids);
    }
    assert_eq!(listed[0], listed[1], "both agents show the same runs");
    // Both agents pull from the shared consumer: each ran a share.
    let started = |metrics: String| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("deadlift_runs_started_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let (on_a, on_b) = (started(a.metrics().await), started(b.metrics().await));
    assert_eq!(on_a + on_b, events as u64, "a ran {on_a}, b ran {on_b}");
    assert!(on_a > 0 && on_b > 0, "a ran {on_a}, b ran {on_b}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_on_a_nats_subject_starts_the_v1_workflow_at_its_second_module() {
    let nats = NatsServer::start();
    let dir = agent_dir();
    let agent = joined(dir.path(), &nats).await;
    upload_v1_modules(&agent).await;
    let created = agent
        .http
        .post(agent.url("/api/v1/workflows"))
        .json(&json!({"name": "orders", "pipeline": ["shop.orders.ingest", "shop.orders.score"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let id = created.text().await.unwrap();
    let workflow = format!("v1-workflow-{id}");

    // The ingest module ran elsewhere: its output, 5, is published on its subject. The
    // agent subscribes within a second of the workflow's creation, so the message is
    // sent until a run appears, always with the same id: it runs once.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-1");
    let mut runs = Vec::new();
    for _ in 0..100 {
        client
            .publish_with_headers("shop.orders.ingest", headers.clone(), "5".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let page = agent
            .http
            .get(agent.url(&format!("/v1/runs?workflow={workflow}")))
            .bearer_auth(crate::common::server::ADMIN)
            .header("x-deadlift-tenant", "v1")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        runs = page["runs"].as_array().cloned().unwrap_or_default();
        if runs.iter().any(|r| r["status"] == "succeeded") {
            break;
        }
    }
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run_id = runs[0]["id"].as_str().unwrap();
    let run = agent
        .http
        .get(agent.url(&format!("/v1/runs/{run_id}")))
        .bearer_auth(crate::common::server::ADMIN)
        .header("x-deadlift-tenant", "v1")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(run["output"], 25, "{run}");
    assert_eq!(run["steps"][0]["status"], "skipped", "{run}");
    assert_eq!(run["event"]["type"], "shop.orders.ingest");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn what_one_agent_is_given_the_others_have() {
    let nats = NatsServer::start();
    let dirs: Vec<_> = (0..3).map(|_| agent_dir()).collect();
    let mut agents = Vec::new();
    for dir in &dirs {
        agents.push(joined(dir.path(), &nats).await);
    }
    let (one, others) = agents.split_first().unwrap();
    let token = one.tenant_token("acme").await;
    configure(one, &token).await;
    let manifest = one
        .http
        .put(one.url("/v1/modules/adder/manifest"))
        .bearer_auth(&token)
        .json(&json!({"config": {"greeting": "Hi"}, "timeout_ms": 500}))
        .send()
        .await
        .unwrap();
    assert!(manifest.status().is_success());

    for other in others {
        // The token made on the first agent works here; the module answers; the
        // workflow runs; the manifest is the same.
        until(|| async {
            other.get_json("/v1/modules/adder/manifest", &token).await["timeout_ms"] == 500
        })
        .await;
        let called = other
            .http
            .post(other.url("/v1/modules/adder/call/_main"))
            .bearer_auth(&token)
            .body("1")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        assert_eq!(called["output"], 11, "{called}");
        let run = other
            .http
            .post(other.url("/v1/workflows/orders/runs?wait=true"))
            .bearer_auth(&token)
            .json(&json!(5))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        assert_eq!(run["output"], 15, "{run}");
    }

    // Deleting the workflow and revoking the token on one agent does so everywhere.
    let deleted = one
        .http
        .delete(one.url("/v1/workflows/orders"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    let tokens = one
        .get_json("/v1/tokens", crate::common::server::ADMIN)
        .await;
    let id = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "acme")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for other in others {
        until(|| async {
            other
                .http
                .get(other.url("/v1/workflows/orders"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
                == 404
        })
        .await;
    }
    let revoked = one
        .http
        .delete(one.url(&format!("/v1/tokens/{id}")))
        .bearer_auth(crate::common::server::ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 204);
    for other in others {
        until(|| async {
            other
                .http
                .get(other.url("/v1/modules"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
                == 401
        })
        .await;
    }
    for agent in agents {
        agent.stop().await;
    }
}

/// A scheduled workflow is on every agent (shared settings), and each of its firings runs
/// once in the cluster: the agent that claims the firing fires it.
#[tokio::test(flavor = "multi_thread")]
async fn each_scheduled_firing_runs_once_in_the_cluster() {
    let nats = NatsServer::start();
    let dirs: Vec<_> = (0..3).map(|_| agent_dir()).collect();
    let mut agents = Vec::new();
    for dir in &dirs {
        agents.push(joined(dir.path(), &nats).await);
    }
    let token = agents[0].tenant_token("acme").await;
    let pushed = agents[0]
        .http
        .post(agents[0].url("/v1/modules?name=adder"))
        .bearer_auth(&token)
        .body(fixture("add_ten"))
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success());
    let applied = agents[0]
        .http
        .put(agents[0].url("/v1/workflows/tick"))
        .bearer_auth(&token)
        .header("content-type", "application/toml")
        .body("trigger = { schedule = \"* * * * * *\" }\n[[steps]]\nid = \"add\"\ncall = \"adder\"\ninput = \"1\"\n")
        .send()
        .await
        .unwrap();
    assert_eq!(
        applied.status().as_u16(),
        200,
        "{}",
        applied.text().await.unwrap()
    );
    for agent in &agents[1..] {
        until(|| async { agent.get_json("/v1/workflows/tick", &token).await["name"] == "tick" })
            .await;
    }
    // Every agent schedules it. Three or more firings later it is deleted (on one agent,
    // so on all), and then every agent shows each firing's run once, and the agents
    // together started exactly one run per firing.
    until(|| async { firing_ids(&agents[0], &token).await.len() >= 3 }).await;
    let deleted = agents[0]
        .http
        .delete(agents[0].url("/v1/workflows/tick"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    // Until the last firings' runs are in every agent's history.
    let (mut shown, mut started) = (Vec::new(), 0);
    for _ in 0..100 {
        (shown, started) = (Vec::new(), 0);
        for agent in &agents {
            let mut ids = firing_ids(agent, &token).await;
            let count = ids.len();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), count, "a firing ran twice: {ids:?}");
            shown.push(ids);
            started += agent
                .metrics()
                .await
                .lines()
                .find_map(|line| line.strip_prefix("deadlift_runs_started_total "))
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
        }
        if shown.iter().all(|ids| *ids == shown[0]) && started == shown[0].len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shown.iter().all(|ids| *ids == shown[0]), "{shown:?}");
    assert_eq!(started, shown[0].len(), "{shown:?}");
    for agent in agents {
        agent.stop().await;
    }
}

/// The event ids of the runs of workflow `tick` an agent shows.
async fn firing_ids(agent: &TestAgent, token: &str) -> Vec<String> {
    let page = agent
        .get_json("/v1/runs?workflow=tick&limit=500", token)
        .await;
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A rollout and a hook binding made through one agent are the others' too, and a
/// canary one agent rolls back by itself is rolled back on the others.
#[tokio::test(flavor = "multi_thread")]
async fn releases_and_hook_bindings_are_shared() {
    let nats = NatsServer::start();
    let dirs: Vec<_> = (0..2).map(|_| agent_dir()).collect();
    let mut agents = Vec::new();
    for dir in &dirs {
        let agent = TestAgent::start_with(dir.path(), |b| {
            b.hook(deadlift_agent::hooks::HookDecl::new(
                "before_charge",
                deadlift_engine::Grant::default(),
            ))
        })
        .await;
        join(&agent, &nats).await;
        agents.push(agent);
    }
    let (one, other) = (&agents[0], &agents[1]);
    let token = one.tenant_token("acme").await;
    for (version, bytes) in [
        ("1", fixture("add_ten")),
        (
            "2",
            wat::parse_str(
                r#"(module (memory (export "memory") 1) (func (export "_main") (result i32) unreachable))"#,
            )
            .unwrap(),
        ),
    ] {
        let pushed = one
            .http
            .post(one.url(&format!("/v1/modules?name=scorer&version={version}")))
            .bearer_auth(&token)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert!(pushed.status().is_success());
    }
    let bound = one
        .http
        .put(one.url("/v1/hooks/before_charge/binding"))
        .bearer_auth(&token)
        .json(&json!({"module": "scorer", "function": "_main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bound.status().as_u16(), 204);
    let started = one
        .http
        .post(one.url("/v1/modules/scorer/rollout"))
        .bearer_auth(&token)
        .json(&json!({"candidate": "2", "percent": 100, "min_calls": 5, "window_s": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        started.status().as_u16(),
        200,
        "{}",
        started.text().await.unwrap()
    );

    // The other agent has the binding and the rollout.
    until(|| async {
        let hooks = other.get_json("/v1/hooks", &token).await;
        hooks[0]["binding"]["module"] == "scorer"
    })
    .await;
    until(|| async {
        let release = other.get_json("/v1/modules/scorer/release", &token).await;
        release["rollout"]["candidate"]["version"] == "2"
    })
    .await;
    // There, the trapping canary takes every call and is rolled back after five...
    for _ in 0..5 {
        let called = other
            .http
            .post(other.url("/v1/modules/scorer/call/_main"))
            .bearer_auth(&token)
            .body("1")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        assert_eq!(called["error"]["code"], "trap", "{called}");
    }
    let release = other.get_json("/v1/modules/scorer/release", &token).await;
    assert!(release["rollout"].is_null(), "{release}");
    // ...and so on the first agent.
    until(|| async {
        one.get_json("/v1/modules/scorer/release", &token).await["rollout"].is_null()
    })
    .await;
    let called = one
        .http
        .post(one.url("/v1/modules/scorer/call/_main"))
        .bearer_auth(&token)
        .body("1")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(called["output"], 11, "{called}");
    for agent in agents {
        agent.stop().await;
    }
}

/// A setting one agent cannot apply (a binding to a hook only the other declares) holds
/// back its events for a while only: then that agent runs its share again.
#[tokio::test(flavor = "multi_thread")]
async fn a_setting_an_agent_cannot_apply_does_not_stop_its_events_for_long() {
    let nats = NatsServer::start();
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let a = TestAgent::start_with(dir_a.path(), |b| {
        b.hook(deadlift_agent::hooks::HookDecl::new(
            "before_charge",
            deadlift_engine::Grant::default(),
        ))
    })
    .await;
    join(&a, &nats).await;
    let b = joined(dir_b.path(), &nats).await;
    let token = a.tenant_token("acme").await;
    configure(&a, &token).await;
    let bound = a
        .http
        .put(a.url("/v1/hooks/before_charge/binding"))
        .bearer_auth(&token)
        .json(&json!({"module": "adder", "function": "_main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bound.status().as_u16(), 204);
    // Past the hold-back (10 s), events are again b's to run too.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let events = 60;
    for n in 0..events {
        post_event(&a, &token, &format!("late-{n}"), n).await;
    }
    until(|| async { runs_by_event(&a, &token).await.len() >= events as usize }).await;
    let on_b = b
        .metrics()
        .await
        .lines()
        .find_map(|line| line.strip_prefix("deadlift_runs_started_total "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(on_b > 0, "agent b ran none of the events");
    a.stop().await;
    b.stop().await;
}

/// Peers check every delivery against one name and key: an agent with another identity
/// cannot join, and is told what to do.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_another_identity_cannot_join() {
    let nats = NatsServer::start();
    let dir = agent_dir();
    let _first = joined(dir.path(), &nats).await;
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = TestAgent::start(stranger_dir.path()).await;
    let refused = stranger
        .agent
        .join_cluster(&ClusterConfig {
            urls: vec![nats.url.clone()],
            ..ClusterConfig::default()
        })
        .await
        .expect_err("another identity is refused");
    assert!(
        matches!(
            refused,
            deadlift_agent::cluster::ClusterError::Identity { .. }
        ),
        "{refused}"
    );
    assert!(refused.to_string().contains("identity.key"), "{refused}");
}

/// Plug-in KV is the cluster's: a count a plug-in keeps goes on whichever agent runs it,
/// the KV API answers the same on every agent, an agent joining brings its own entries,
/// and another tenant sees none of it.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_kv_is_one_store_for_the_cluster() {
    let nats = NatsServer::start();
    let grant = deadlift_engine::Grant::default().allow(["kv_get", "kv_set", "kv_delete"]);
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let a = TestAgent::start_with(dir_a.path(), |b| b.default_grant(grant.clone())).await;
    let b = TestAgent::start_with(dir_b.path(), |b| b.default_grant(grant.clone())).await;
    let token = a.tenant_token("acme").await;
    // Written by the second agent before it is in the cluster.
    let b_token = b.tenant_token("acme").await;
    let put = b
        .http
        .put(b.url("/v1/kv/brought"))
        .bearer_auth(&b_token)
        .body("from b")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 204);
    for agent in [&a, &b] {
        join(agent, &nats).await;
    }
    let pushed = a
        .http
        .post(a.url("/v1/modules?name=counter"))
        .bearer_auth(&token)
        .body(fixture("kv_counter"))
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success());
    let call = |agent: &TestAgent| {
        agent
            .http
            .post(agent.url("/v1/modules/counter/call/increment"))
            .bearer_auth(&token)
            .body("visits")
            .send()
    };
    // The module reaches the second agent a moment later.
    let mut counts = Vec::new();
    let first: Value = call(&a).await.unwrap().json().await.unwrap();
    counts.push(first["output"].clone());
    for _ in 0..100 {
        let answer = call(&b).await.unwrap();
        if answer.status().is_success() {
            let out: Value = answer.json().await.unwrap();
            counts.push(out["output"].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let third: Value = call(&a).await.unwrap().json().await.unwrap();
    counts.push(third["output"].clone());
    assert_eq!(counts, [json!(1), json!(2), json!(3)]);
    for agent in [&a, &b] {
        let read = |path: &str| agent.http.get(agent.url(path)).bearer_auth(&token).send();
        assert_eq!(
            read("/v1/kv/visits").await.unwrap().text().await.unwrap(),
            "3"
        );
        assert_eq!(
            read("/v1/kv/brought").await.unwrap().text().await.unwrap(),
            "from b"
        );
        let keys: Value = read("/v1/kv").await.unwrap().json().await.unwrap();
        assert_eq!(keys["keys"], json!(["brought", "visits"]));
        let keys: Value = read("/v1/kv?prefix=vis")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(keys["keys"], json!(["visits"]));
    }
    let deleted = b
        .http
        .delete(b.url("/v1/kv/brought"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    let gone = a
        .http
        .get(a.url("/v1/kv/brought"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(gone, 404, "key_not_found").await;
    // Another tenant: nothing of acme's, on any agent.
    let globex = a.tenant_token("globex").await;
    for agent in [&a, &b] {
        for _ in 0..100 {
            let known = agent
                .http
                .get(agent.url("/v1/whoami"))
                .bearer_auth(&globex)
                .send()
                .await
                .unwrap();
            if known.status().is_success() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let read = agent
            .http
            .get(agent.url("/v1/kv/visits"))
            .bearer_auth(&globex)
            .send()
            .await
            .unwrap();
        TestAgent::expect_error(read, 404, "key_not_found").await;
        let keys: Value = agent
            .http
            .get(agent.url("/v1/kv"))
            .bearer_auth(&globex)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(keys["keys"], json!([]));
    }
}

/// A peer's delivery to any agent of the cluster is stored in the cluster's stream, once
/// among that peer's ids, and runs as the peer's event wherever it is journaled.
#[tokio::test(flavor = "multi_thread")]
async fn a_peers_delivery_to_any_agent_runs_once_in_the_cluster() {
    use deadlift_agent::federation::{Identity, Webhook};
    let nats = NatsServer::start();
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let a = joined(dir_a.path(), &nats).await;
    let b = joined(dir_b.path(), &nats).await;
    let token = a.tenant_token("acme").await;
    configure(&a, &token).await;
    let partner_dir = tempfile::tempdir().unwrap();
    let partner = Identity::load_or_create(partner_dir.path(), "partner").unwrap();
    let added = a
        .http
        .post(a.url("/v1/peers"))
        .bearer_auth(crate::common::server::ADMIN)
        .json(&json!({"name": "partner", "url": "http://127.0.0.1:9",
                      "public_key": partner.public_key(), "tenant": "acme",
                      "accept": ["orders.*"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status().as_u16(), 201);
    let deliver = |agent: &TestAgent, webhook_id: &str| {
        let body = json!({"specversion": "1.0", "id": "p-1", "source": "/partner",
                          "type": "orders.created", "data": 1})
        .to_string();
        let signed = Webhook::sign(
            &partner,
            webhook_id.to_owned(),
            unix_now_secs(),
            body.as_bytes(),
        );
        let mut request = agent
            .http
            .post(agent.url("/v1/peer/events"))
            .header("content-type", "application/cloudevents+json");
        for (name, value) in signed.headers() {
            request = request.header(name, value);
        }
        request.body(body).send()
    };
    // The peer reaches the second agent a moment later.
    let mut first = Value::Null;
    for _ in 0..100 {
        let answer = deliver(&b, "w-1").await.unwrap();
        if answer.status().is_success() {
            first = answer.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(first["events"][0]["clustered"], true, "{first}");
    assert_eq!(first["events"][0]["duplicate"], false, "{first}");
    // Delivered again (a retry) to the other agent: stored once.
    let again: Value = deliver(&a, "w-2").await.unwrap().json().await.unwrap();
    assert_eq!(again["events"][0]["duplicate"], true, "{again}");
    for agent in [&a, &b] {
        until(|| async {
            let runs: Value = agent
                .http
                .get(agent.url("/v1/runs?workflow=orders"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            runs["runs"].as_array().is_some_and(|r| {
                r.len() == 1 && r[0]["status"] == "succeeded" && r[0]["event_id"] == "p-1"
            })
        })
        .await;
    }
}

fn unix_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An event a module emits outside a run (a direct call) goes to the cluster's stream,
/// not into the calling agent's own journal, and its run is the cluster's.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_a_module_emits_in_a_direct_call_goes_to_the_cluster() {
    let nats = NatsServer::start();
    let grant = deadlift_engine::Grant::default().allow(["emit"]);
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let mut agents = Vec::new();
    for dir in [&dir_a, &dir_b] {
        let agent = TestAgent::start_with(dir.path(), |b| b.default_grant(grant.clone())).await;
        join(&agent, &nats).await;
        agents.push(agent);
    }
    let (a, b) = (&agents[0], &agents[1]);
    let token = a.tenant_token("acme").await;
    configure(a, &token).await;
    let pushed = a
        .http
        .post(a.url("/v1/modules?name=emitter"))
        .bearer_auth(&token)
        .body(fixture("emitter"))
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success());
    let jetstream = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let stored = || async {
        let mut events = jetstream
            .get_stream(deadlift_agent::cluster::EVENTS_STREAM)
            .await
            .unwrap();
        events.info().await.unwrap().state.last_sequence
    };
    let before = stored().await;
    let mut called = false;
    for _ in 0..100 {
        let answer = b
            .http
            .post(b.url("/v1/modules/emitter/call/emit_event"))
            .bearer_auth(&token)
            .body(r#"{"type": "orders.created", "data": 5}"#)
            .send()
            .await
            .unwrap();
        if answer.status().is_success() {
            called = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(called, "the module never reached the second agent");
    assert_eq!(
        stored().await,
        before + 1,
        "the emitted event is in the stream"
    );
    for agent in [a, b] {
        until(|| async {
            let runs: Value = agent
                .http
                .get(agent.url("/v1/runs?workflow=orders"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            runs["runs"]
                .as_array()
                .is_some_and(|r| r.len() == 1 && r[0]["status"] == "succeeded")
        })
        .await;
    }
}

/// An agent's live list of runs shows the cluster's runs as they finish, the ones other
/// agents ran included (marked imported, so that it does not export them again).
#[tokio::test(flavor = "multi_thread")]
async fn the_live_list_shows_runs_other_agents_ran() {
    let nats = NatsServer::start();
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let a = joined(dir_a.path(), &nats).await;
    let b = joined(dir_b.path(), &nats).await;
    let token = a.tenant_token("acme").await;
    configure(&a, &token).await;
    let (mut updates, _) = b.agent.workflows().subscribe();
    let events = 40;
    for n in 0..events {
        let to = if n % 2 == 0 { &a } else { &b };
        post_event(to, &token, &format!("live-{n}"), n).await;
    }
    let mut seen = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < events as usize {
        let update = tokio::time::timeout_at(deadline, updates.recv())
            .await
            .expect("every run shows on the live list")
            .unwrap();
        if update.run.status.is_finished() {
            seen.insert(update.run.id.clone(), update.imported);
        }
    }
    // Some ran on each agent: the imported ones are the first agent's.
    assert!(seen.values().any(|imported| *imported), "{seen:?}");
    assert!(seen.values().any(|imported| !*imported), "{seen:?}");
}

/// Dead letters are answered by every agent: a failed run another agent ran is a dead
/// letter here too, but it is replayed (or retried) on the agent that ran it, and only
/// there, so that it cannot run twice.
#[tokio::test(flavor = "multi_thread")]
async fn every_agent_shows_dead_letters_and_the_one_that_ran_the_run_replays_it() {
    let nats = NatsServer::start();
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let a = joined(dir_a.path(), &nats).await;
    let b = joined(dir_b.path(), &nats).await;
    let token = a.tenant_token("acme").await;
    let pushed = a
        .http
        .post(a.url("/v1/modules?name=trapper"))
        .bearer_auth(&token)
        .body(fixture("trapper"))
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success());
    let applied = a
        .http
        .put(a.url("/v1/workflows/orders"))
        .bearer_auth(&token)
        .header("content-type", "application/toml")
        .body("trigger = { event = \"orders.created\" }\n[[steps]]\nid = \"t\"\ncall = \"trapper\"\nfunction = \"trap\"\n")
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status().as_u16(), 200);
    let events = 10;
    for n in 0..events {
        let to = if n % 2 == 0 { &a } else { &b };
        post_event(to, &token, &format!("bad-{n}"), n).await;
    }
    let dead_letters = |agent: &TestAgent| {
        let request = agent
            .http
            .get(agent.url("/v1/dead-letters"))
            .bearer_auth(&token)
            .send();
        async move {
            let body: Value = request.await.unwrap().json().await.unwrap();
            body.as_array().cloned().unwrap_or_default()
        }
    };
    for agent in [&a, &b] {
        until(|| async { dead_letters(agent).await.len() == events as usize }).await;
    }
    // Each agent replays the ones it ran, and refuses the others'.
    let runs_here = |agent: &TestAgent| {
        let request = agent
            .http
            .get(agent.url("/v1/runs?workflow=orders"))
            .bearer_auth(&token)
            .send();
        async move {
            let body: Value = request.await.unwrap().json().await.unwrap();
            body["runs"].as_array().cloned().unwrap_or_default()
        }
    };
    let (mut replayed, mut refused) = (0, 0);
    for agent in [&a, &b] {
        assert_eq!(runs_here(agent).await.len(), events as usize);
        for letter in dead_letters(agent).await {
            let answer = agent
                .http
                .post(agent.url(&format!("/v1/dead-letters/{}/replay", letter["id"])))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            if answer.status().is_success() {
                replayed += 1;
            } else {
                TestAgent::expect_error(answer, 409, "run_elsewhere").await;
                refused += 1;
                let retry = agent
                    .http
                    .post(agent.url(&format!(
                        "/v1/runs/{}/retry",
                        letter["run_id"].as_str().unwrap()
                    )))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                TestAgent::expect_error(retry, 409, "run_elsewhere").await;
            }
        }
    }
    // Every run replayed exactly once, by the agent that ran it.
    assert_eq!((replayed, refused), (events, events), "replayed, refused");
}

/// The policy is the cluster's: a policy put through one agent holds on the others.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_put_on_one_agent_holds_on_the_others() {
    let nats = NatsServer::start();
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let a = joined(dir_a.path(), &nats).await;
    let b = joined(dir_b.path(), &nats).await;
    let admin = crate::common::server::ADMIN;
    let mut policy: Value = a
        .http
        .get(a.url("/v1/policy"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    policy["default"]["max_timeout_ms"] = json!(1234);
    let put = a
        .http
        .put(a.url("/v1/policy"))
        .bearer_auth(admin)
        .json(&policy)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 200);
    until(|| async {
        let there: Value = b
            .http
            .get(b.url("/v1/policy"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        there["default"]["max_timeout_ms"] == 1234
    })
    .await;
}

/// The original's v1 workflows are the cluster's: ids are one space across the agents,
/// and a v1 workflow created on one agent executes on another.
#[tokio::test(flavor = "multi_thread")]
async fn v1_workflows_are_shared_with_ids_unique_in_the_cluster() {
    let nats = NatsServer::start();
    let (dir_a, dir_b) = (agent_dir(), agent_dir());
    let a = joined(dir_a.path(), &nats).await;
    let b = joined(dir_b.path(), &nats).await;
    upload_v1_modules(&a).await;
    let create = |agent: &TestAgent| {
        agent
            .http
            .post(agent.url("/api/v1/workflows"))
            .json(
                &json!({"name": "orders", "pipeline": ["shop.orders.ingest", "shop.orders.score"]}),
            )
            .send()
    };
    let first = create(&a).await.unwrap().text().await.unwrap();
    // The second agent has the modules a moment later.
    let mut second = None;
    for _ in 0..100 {
        let answer = create(&b).await.unwrap();
        if answer.status().as_u16() == 201 {
            second = Some(answer.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = second.expect("the second agent creates a v1 workflow");
    assert_ne!(first, second, "v1 workflow ids are unique in the cluster");
    for (agent, id) in [(&b, &first), (&a, &second)] {
        let mut output = Value::Null;
        for _ in 0..100 {
            let answer = agent
                .http
                .post(agent.url(&format!("/api/v1/workflows/{id}/execute")))
                .json(&json!(1))
                .send()
                .await
                .unwrap();
            if answer.status().is_success() {
                output = answer.json().await.unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(output, json!(55), "v1 workflow {id} on the other agent");
    }
}
