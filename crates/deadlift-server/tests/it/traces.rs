//! One trace across agents (`/v1/traces`, `/v1/peer-views`), attacked from every side: a
//! tenant reaching for another tenant's peer or view, an admin moving a peer to another
//! tenant, and a peer that answers runs of other traces or more than it may.

use serde_json::{Value, json};

use crate::common::fixture;
use crate::common::server::{ADMIN, TestAgent};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// Starts a one-step run of `add-ten` for `token`'s tenant in trace [`TRACE`]; its id.
async fn run_in_trace(agent: &TestAgent, token: &str) -> String {
    let pushed = agent
        .http
        .post(agent.url("/v1/modules?name=add-ten"))
        .bearer_auth(token)
        .body(fixture("add_ten"))
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success());
    let applied = agent
        .http
        .put(agent.url("/v1/workflows/calc"))
        .bearer_auth(token)
        .header("content-type", "application/toml")
        .body("[[steps]]\nid = \"add\"\ncall = \"add-ten\"\n")
        .send()
        .await
        .unwrap();
    assert!(applied.status().is_success());
    let run: Value = agent
        .http
        .post(agent.url("/v1/workflows/calc/runs?wait=true"))
        .bearer_auth(token)
        .header("traceparent", format!("00-{TRACE}-b7ad6b7169203331-01"))
        .body("1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    run["id"].as_str().unwrap().to_owned()
}

async fn trace(agent: &TestAgent, token: &str) -> Value {
    let response = agent
        .http
        .get(agent.url(&format!("/v1/traces/{TRACE}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

async fn add_peer(agent: &TestAgent, name: &str, url: &str, tenant: &str) {
    let added = agent
        .http
        .post(agent.url("/v1/peers"))
        .bearer_auth(ADMIN)
        .json(&json!({
            "name": name, "url": url, "tenant": tenant,
            "public_key": agent.agent.federation().identity().public_key(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status().as_u16(), 201);
}

async fn set_view(
    agent: &TestAgent,
    token: &str,
    peer: &str,
    view_token: &str,
) -> reqwest::Response {
    agent
        .http
        .put(agent.url(&format!("/v1/peer-views/{peer}")))
        .bearer_auth(token)
        .json(&json!({ "token": view_token }))
        .send()
        .await
        .unwrap()
}

/// A peer agent that answers every trace with `body`.
async fn hostile_peer(body: Vec<u8>) -> String {
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move { ([("content-type", "application/json")], body) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Issue 14: a trace shows this agent's runs and each viewable peer's, and only the
/// asking tenant's, whatever the other tenants and peers try.
#[tokio::test(flavor = "multi_thread")]
async fn a_trace_joins_a_peers_side_and_nothing_else() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let platform = TestAgent::start(dirs.0.path()).await;
    let acme_agent = TestAgent::start(dirs.1.path()).await;
    let acme_on_platform = platform.tenant_token("acme").await;
    let globex_on_platform = platform.tenant_token("globex").await;
    let acme_own = acme_agent.tenant_token("acme").await;
    let platform_run = run_in_trace(&platform, &acme_on_platform).await;
    let own_run = run_in_trace(&acme_agent, &acme_own).await;
    // Globex runs in the same trace on the platform: Acme must never see its run.
    let globex_run = run_in_trace(&platform, &globex_on_platform).await;

    add_peer(&acme_agent, "platform", &platform.url, "acme").await;
    // A tenant cannot reach for a peer that serves another tenant.
    let globex_own = acme_agent.tenant_token("globex").await;
    TestAgent::expect_error(
        set_view(&acme_agent, &globex_own, "platform", &acme_on_platform).await,
        404,
        "peer_not_found",
    )
    .await;
    TestAgent::expect_error(
        set_view(&acme_agent, &acme_own, "platform", "").await,
        400,
        "peer_invalid",
    )
    .await;
    let stored = set_view(&acme_agent, &acme_own, "platform", &acme_on_platform).await;
    assert_eq!(stored.status().as_u16(), 200);
    let views = acme_agent.get_json("/v1/peer-views", &acme_own).await;
    assert_eq!(views[0]["peer"], "platform");
    assert!(!views.to_string().contains(&acme_on_platform), "{views}");

    // Acme sees its own run and the platform's, and not Globex's.
    let seen = trace(&acme_agent, &acme_own).await;
    assert_eq!(seen["runs"][0]["id"], own_run.as_str());
    assert_eq!(seen["peers"][0]["peer"], "platform");
    let theirs = seen["peers"][0]["runs"].as_array().unwrap();
    assert_eq!(theirs.len(), 1, "{seen}");
    assert_eq!(theirs[0]["id"], platform_run.as_str());
    assert!(!seen.to_string().contains(&globex_run));
    // Globex on Acme's agent sees none of it.
    let other = trace(&acme_agent, &globex_own).await;
    assert_eq!(other["runs"], json!([]));
    assert_eq!(other["peers"], json!([]));

    // The admin moves the peer to Globex: Acme's token is not Globex's to use, and Acme
    // no longer sees a peer that does not serve it.
    add_peer(&acme_agent, "platform", &platform.url, "globex").await;
    assert_eq!(trace(&acme_agent, &globex_own).await["peers"], json!([]));
    assert_eq!(trace(&acme_agent, &acme_own).await["peers"], json!([]));

    // A hostile peer answering runs of another trace: they are dropped.
    let mut stray: Value = platform
        .http
        .get(platform.url(&format!("/v1/runs/{platform_run}")))
        .bearer_auth(&acme_on_platform)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stray["trace_id"] = json!("4bf92f3577b34da6a3ce929d0e0e4736");
    let liar = hostile_peer(
        serde_json::to_vec(&json!({"trace_id": TRACE, "agent": "liar", "runs": [stray]})).unwrap(),
    )
    .await;
    add_peer(&acme_agent, "liar", &liar, "acme").await;
    assert_eq!(
        set_view(&acme_agent, &acme_own, "liar", "x")
            .await
            .status()
            .as_u16(),
        200
    );
    let seen = trace(&acme_agent, &acme_own).await;
    assert_eq!(seen["peers"][0]["agent"], "liar");
    assert_eq!(seen["peers"][0]["runs"], json!([]));
    // One answering more than the cap: an error on that side, the rest answered.
    let flood = hostile_peer(vec![b' '; 9 << 20]).await;
    add_peer(&acme_agent, "flood", &flood, "acme").await;
    assert_eq!(
        set_view(&acme_agent, &acme_own, "flood", "x")
            .await
            .status()
            .as_u16(),
        200
    );
    let seen = trace(&acme_agent, &acme_own).await;
    let flooded = seen["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == "flood")
        .unwrap();
    assert_eq!(flooded["error"]["code"], "peer_unreachable", "{flooded}");
    assert_eq!(seen["runs"][0]["id"], own_run.as_str());

    platform.stop().await;
    acme_agent.stop().await;
}
