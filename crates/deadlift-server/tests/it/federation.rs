//! Federation between two agents in this process, over real HTTP on loopback: what a
//! tenant or a peer can make an agent send, and how deliveries are judged.

use std::time::Duration;

use deadlift_agent::federation::{OutboxStatus, Peer};
use serde_json::{Value, json};

use crate::common::server::{ADMIN, TestAgent};

/// Makes `to` a peer of `from` under the name `name` (`to`'s agent name), for tenant
/// `default`.
async fn peer(from: &TestAgent, to: &TestAgent, name: &str, send: &[&str], accept: &[&str]) {
    let identity = to.agent.federation().identity();
    from.agent
        .federation()
        .add_peer(Peer {
            name: name.into(),
            url: to.url.clone(),
            public_key: identity.public_key(),
            tenant: "default".into(),
            send: send.iter().map(|s| s.to_string()).collect(),
            accept: accept.iter().map(|s| s.to_string()).collect(),
            created_unix_ms: 0,
        })
        .await
        .unwrap();
}

async fn publish(agent: &TestAgent, events: Value) -> reqwest::Response {
    agent
        .http
        .post(agent.url("/v1/events"))
        .bearer_auth(ADMIN)
        .header("x-deadlift-tenant", "default")
        .header("content-type", "application/cloudevents-batch+json")
        .json(&events)
        .send()
        .await
        .unwrap()
}

fn event(id: &str, event_type: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/tests", "type": event_type, "data": 1})
}

/// Waits until `agent` has no pending delivery; returns its outbox.
async fn settled_outbox(agent: &TestAgent) -> Vec<deadlift_agent::federation::OutboxEntry> {
    for _ in 0..200 {
        let outbox = agent.agent.federation().outbox(None, 100).await.unwrap();
        if outbox.iter().all(|e| e.status != OutboxStatus::Pending) {
            return outbox;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("deliveries never settled");
}

/// Issue 11: one event the peer refused dead-lettered the whole batch it was sent in;
/// and events received from one peer were re-sent to other peers under this agent's
/// signature.
#[tokio::test]
async fn a_refused_event_is_dead_alone_and_received_events_are_not_relayed() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestAgent::start_with(a_dir.path(), |builder| builder.name("a")).await;
    let b = TestAgent::start_with(b_dir.path(), |builder| builder.name("b")).await;
    peer(&a, &b, "b", &[">"], &[]).await;
    peer(&b, &a, "a", &[], &["ok.>"]).await;
    // B has a third peer it sends everything to; nothing A sends may go there.
    let elsewhere = Peer {
        name: "c".into(),
        url: "http://127.0.0.1:9".into(),
        public_key: a.agent.federation().identity().public_key(),
        tenant: "default".into(),
        send: vec![">".into()],
        accept: Vec::new(),
        created_unix_ms: 0,
    };
    b.agent.federation().add_peer(elsewhere).await.unwrap();

    let published = publish(
        &a,
        json!([
            event("e-1", "ok.one"),
            event("e-2", "bad.one"),
            event("e-3", "ok.two")
        ]),
    )
    .await;
    assert_eq!(published.status().as_u16(), 202);
    let outbox = settled_outbox(&a).await;
    let status = |id: &str| {
        let entry = outbox.iter().find(|e| e.event_id == id).unwrap();
        (entry.status, entry.last_error.clone().unwrap_or_default())
    };
    assert_eq!(status("e-1").0, OutboxStatus::Delivered, "{outbox:?}");
    assert_eq!(status("e-3").0, OutboxStatus::Delivered, "{outbox:?}");
    let (refused, reason) = status("e-2");
    assert_eq!(refused, OutboxStatus::Dead);
    assert!(reason.contains("bad.one"), "{reason}");
    // B stored the two accepted events and sent none of them on to C.
    let stored = &b.agent.workflows().stats().events_stored;
    assert_eq!(stored.load(std::sync::atomic::Ordering::Relaxed), 2);
    let relayed = b.agent.federation().outbox(None, 100).await.unwrap();
    assert!(relayed.is_empty(), "{relayed:?}");
    a.stop().await;
    b.stop().await;
}

/// Issue 11: a tenant published an event carrying `deadliftto: "<peer>"` with a type
/// outside that peer's send patterns, and it was sent.
#[tokio::test]
async fn a_tenant_cannot_address_a_peer_with_the_routing_extension() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestAgent::start_with(a_dir.path(), |builder| builder.name("a")).await;
    let b = TestAgent::start_with(b_dir.path(), |builder| builder.name("b")).await;
    peer(&a, &b, "b", &["public.>"], &[]).await;
    let mut addressed = event("e-1", "secret.thing");
    addressed["deadliftto"] = json!("b");
    let refused = publish(&a, json!([addressed])).await;
    TestAgent::expect_error(refused, 400, "event_invalid").await;
    assert!(
        a.agent
            .federation()
            .outbox(None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    a.stop().await;
    b.stop().await;
}

/// Issue 11: dedupe was per (tenant, id), so peer `evil` sending id `X` first
/// suppressed peer `good`'s event `X`.
#[tokio::test]
async fn one_peers_event_id_does_not_suppress_anothers() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let good = TestAgent::start_with(dirs[0].path(), |b| b.name("good")).await;
    let evil = TestAgent::start_with(dirs[1].path(), |b| b.name("evil")).await;
    let receiver = TestAgent::start_with(dirs[2].path(), |b| b.name("receiver")).await;
    for sender in [&good, &evil] {
        peer(sender, &receiver, "receiver", &["orders.>"], &[]).await;
    }
    peer(&receiver, &good, "good", &[], &["orders.>"]).await;
    peer(&receiver, &evil, "evil", &[], &["orders.>"]).await;
    // Evil's first, then good's, with the same id.
    for sender in [&evil, &good] {
        let published = publish(sender, json!([event("X", "orders.created")])).await;
        assert_eq!(published.status().as_u16(), 202);
        let outbox = settled_outbox(sender).await;
        assert_eq!(outbox[0].status, OutboxStatus::Delivered, "{outbox:?}");
    }
    let stats = receiver.agent.workflows().stats();
    assert_eq!(
        stats
            .events_stored
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(
        stats
            .events_duplicate
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // (A peer's own redelivery of an id stays a duplicate: the CLI's federation test
    // replays a delivery and sees one effect.)
    for agent in [good, evil, receiver] {
        agent.stop().await;
    }
}

/// Issue 11: peers registered without a tenant landed in `default`, which the v1 routes
/// opened without a token. Every peer now names its tenant.
#[tokio::test]
async fn a_peer_must_name_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let key = agent.agent.federation().identity().public_key();
    let refused = agent
        .http
        .post(agent.url("/v1/peers"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "acme", "url": "http://127.0.0.1:9", "public_key": key}))
        .send()
        .await
        .unwrap();
    let message = TestAgent::expect_error(refused, 400, "invalid_json").await;
    assert!(message.contains("tenant"), "{message}");
    agent.stop().await;
}

/// Issue 14: `/metrics` had no backlog gauges. A delivery to a peer that cannot be
/// reached waits in the outbox, and the gauge says so.
#[tokio::test]
async fn metrics_show_the_backlogs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    agent
        .agent
        .federation()
        .add_peer(Peer {
            name: "gone".into(),
            // Nothing listens on the discard port.
            url: "http://127.0.0.1:9".into(),
            public_key: agent.agent.federation().identity().public_key(),
            tenant: "default".into(),
            send: vec!["gone.>".into()],
            accept: Vec::new(),
            created_unix_ms: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        publish(&agent, json!([event("g-1", "gone.out")]))
            .await
            .status()
            .as_u16(),
        202
    );
    let metrics = agent.metrics().await;
    assert!(metrics.contains("deadlift_outbox_pending 1"), "{metrics}");
    assert!(metrics.contains("deadlift_runs_queued 0"), "{metrics}");
    // The journal's backlog (events awaiting storage and routing among its writes).
    assert!(
        metrics.contains("# TYPE deadlift_journal_writes_waiting gauge"),
        "{metrics}"
    );
    assert!(metrics.contains("deadlift_runs_running 0"), "{metrics}");
    agent.stop().await;
}

/// Issue 14: deliveries to peers carried the trace only inside the body. The
/// `traceparent` header now travels too: a bare listener in the peer's place reads it.
#[tokio::test]
async fn deliveries_carry_the_trace_as_a_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        // Read the head (and whatever of the body comes with it).
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the delivery ended early");
            request.extend_from_slice(&buffer[..n]);
        }
        let body = b"{\"refused\": []}";
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        socket.write_all(answer.as_bytes()).await.unwrap();
        socket.write_all(body).await.unwrap();
        String::from_utf8_lossy(&request).to_lowercase()
    });
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    agent
        .agent
        .federation()
        .add_peer(Peer {
            name: "listener".into(),
            url,
            public_key: agent.agent.federation().identity().public_key(),
            tenant: "default".into(),
            send: vec!["traced.>".into()],
            accept: Vec::new(),
            created_unix_ms: 0,
        })
        .await
        .unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut traced = event("t-1", "traced.out");
    traced["traceparent"] = json!(format!("00-{trace}-00f067aa0ba902b7-01"));
    assert_eq!(
        publish(&agent, json!([traced])).await.status().as_u16(),
        202
    );
    let request = tokio::time::timeout(Duration::from_secs(10), received)
        .await
        .expect("the delivery came")
        .unwrap();
    let header = request
        .lines()
        .find_map(|line| line.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent header in\n{request}"));
    assert!(header.starts_with(&format!("00-{trace}-")), "{header}");
    agent.stop().await;
}
