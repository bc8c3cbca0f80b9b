//! Issue 13: three `deadlift serve` processes on a three-node NATS cluster (JetStream, R3
//! streams), all on loopback. Events are posted round-robin, some twice to different
//! agents; a third of the way through one agent is killed (SIGKILL), two thirds of the
//! way one NATS node. Every accepted event ends with exactly one succeeded run, and each
//! surviving agent shows every one of them.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Server, fixture};

const ADMIN: &str = "test-admin-token-Zq3xV9pL2mR7tK4wY8nB6cH1";

/// Three nats-servers routed into one cluster, JetStream on; killed when dropped.
struct NatsCluster {
    nodes: Vec<Option<Child>>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsCluster {
    fn start() -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/nats-server");
        let installed = Command::new(script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(installed.status.success(), "scripts/nats-server failed");
        let binary = String::from_utf8(installed.stdout)
            .unwrap()
            .trim()
            .to_owned();
        let dir = tempfile::tempdir().unwrap();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for n in 0..3 {
            let others: Vec<String> = (0..3)
                .filter(|m| *m != n)
                .map(|m| format!("nats://127.0.0.1:{}", routes[m]))
                .collect();
            let child = Command::new(&binary)
                .args(["--jetstream", "--addr", "127.0.0.1"])
                .args(["--server_name", &format!("n{n}")])
                .args(["--port", &clients[n].to_string()])
                .args(["--cluster_name", "deadlift"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[n])])
                .args(["--routes", &others.join(",")])
                .arg("--store_dir")
                .arg(dir.path().join(format!("n{n}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            nodes.push(Some(child));
        }
        Self {
            nodes,
            urls: clients
                .iter()
                .map(|port| format!("nats://127.0.0.1:{port}"))
                .collect(),
            _dir: dir,
        }
    }

    fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            self.kill(node);
        }
    }
}

#[test]
fn a_cluster_loses_no_event_when_an_agent_and_a_nats_node_die() {
    let mut nats = NatsCluster::start();
    let urls = nats.urls.join(",");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents: Vec<Option<Server>> = dirs
        .iter()
        .map(|dir| {
            Some(Server::start_with(
                dir.path(),
                &[
                    ("DEADLIFT_NATS", &urls),
                    ("DEADLIFT_NATS_REPLICAS", "3"),
                    ("DEADLIFT_NATS_ACK_WAIT_SECS", "3"),
                    ("DEADLIFT_ADMIN_TOKEN", ADMIN),
                ],
            ))
        })
        .collect();
    let url = |agents: &[Option<Server>], n: usize| agents[n].as_ref().map(|a| a.url.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let first = url(&agents, 0).unwrap();

    // Acme, its module and its workflow, made on the first agent only.
    let token = runtime.block_on(async {
        let created = http
            .post(format!("{first}/v1/tenants"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "acme"}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status().as_u16(), 201);
        let token: Value = http
            .post(format!("{first}/v1/tenants/acme/tokens"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = token["token"].as_str().unwrap().to_owned();
        let pushed = http
            .post(format!("{first}/v1/modules?name=adder"))
            .bearer_auth(&token)
            .body(std::fs::read(fixture("add_ten")).unwrap())
            .send()
            .await
            .unwrap();
        assert!(pushed.status().is_success());
        let applied = http
            .put(format!("{first}/v1/workflows/orders"))
            .bearer_auth(&token)
            .header("content-type", "application/toml")
            .body("trigger = { event = \"orders.created\" }\n[[steps]]\nid = \"add\"\ncall = \"adder\"\n")
            .send()
            .await
            .unwrap();
        assert_eq!(applied.status().as_u16(), 200);
        token
    });
    // The token must be on every agent before events go to them.
    runtime.block_on(async {
        for n in 1..3 {
            let base = url(&agents, n).unwrap();
            for _ in 0..200 {
                let status = http
                    .get(format!("{base}/v1/whoami"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .status();
                if status.is_success() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    // Posts one event to the living agents, starting with agent `n`, until one accepts
    // it (a NATS node's death makes the cluster answer 503 for a moment).
    let post = |agents: &[Option<Server>], n: usize, id: &str| -> bool {
        let body = json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "orders.created", "data": 1});
        runtime.block_on(async {
            for attempt in 0..60 {
                let Some(base) = url(agents, (n + attempt) % 3) else {
                    continue;
                };
                let sent = http
                    .post(format!("{base}/v1/events"))
                    .bearer_auth(&token)
                    .header("content-type", "application/cloudevents+json")
                    .body(body.to_string())
                    .send()
                    .await;
                if let Ok(response) = sent
                    && response.status().as_u16() == 202
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        })
    };

    let events = 1200;
    let mut accepted = Vec::new();
    for n in 0..events {
        if n == events / 3 {
            // SIGKILL: no goodbye, events in its hands and runs under way included.
            drop(agents[2].take());
        }
        if n == 2 * events / 3 {
            nats.kill(1);
        }
        let id = format!("order-{n}");
        if post(&agents, n % 3, &id) {
            accepted.push(id.clone());
        }
        if n % 10 == 0 {
            // Again, to another agent: the cluster stores it once.
            post(&agents, (n + 1) % 3, &id);
        }
    }
    assert!(
        accepted.len() >= events * 9 / 10,
        "{} accepted",
        accepted.len()
    );

    // Every accepted event: one succeeded run, shown by each surviving agent.
    for n in 0..2 {
        let base = url(&agents, n).unwrap();
        let mut by_event: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for _ in 0..600 {
            by_event.clear();
            let mut before: Option<i64> = None;
            loop {
                let page: Value = runtime.block_on(async {
                    let mut request = http
                        .get(format!("{base}/v1/runs"))
                        .bearer_auth(&token)
                        .query(&[("workflow", "orders"), ("limit", "500")]);
                    if let Some(before) = before {
                        request = request.query(&[("before", before)]);
                    }
                    request.send().await.unwrap().json().await.unwrap()
                });
                for run in page["runs"].as_array().unwrap() {
                    by_event
                        .entry(run["event_id"].as_str().unwrap().to_owned())
                        .or_default()
                        .push(run["status"].as_str().unwrap().to_owned());
                }
                match page["next"].as_i64() {
                    Some(next) => before = Some(next),
                    None => break,
                }
            }
            let done = accepted.iter().all(|id| {
                by_event
                    .get(id)
                    .is_some_and(|runs| runs.iter().any(|s| s == "succeeded"))
            });
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let missing: Vec<&String> = accepted
            .iter()
            .filter(|id| {
                !by_event
                    .get(*id)
                    .is_some_and(|runs| runs.iter().any(|s| s == "succeeded"))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "agent {n}: no succeeded run for {} events: {:?}",
            missing.len(),
            missing
                .iter()
                .take(10)
                .map(|id| (id, by_event.get(*id)))
                .collect::<Vec<_>>()
        );
        let doubled: Vec<(&String, &Vec<String>)> = by_event
            .iter()
            .filter(|(_, runs)| runs.iter().filter(|s| *s == "succeeded").count() > 1)
            .collect();
        assert!(
            doubled.is_empty(),
            "agent {n}: events that succeeded twice: {doubled:?}"
        );
    }

    // With every NATS server gone, an agent still stops when told to (SIGTERM).
    drop(nats);
    let mut survivor = agents[0].take().unwrap();
    Command::new("kill")
        .args(["-TERM", &survivor.child.id().to_string()])
        .status()
        .unwrap();
    let mut stopped = None;
    for _ in 0..300 {
        stopped = survivor.child.try_wait().unwrap();
        if stopped.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stopped.is_some_and(|status| status.success()),
        "the agent did not stop within 15 s without NATS: {stopped:?}"
    );
}
