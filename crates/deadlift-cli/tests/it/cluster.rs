//! Issue 13, with real processes on loopback:
//! - three `deadlift serve` processes on a three-node NATS cluster (JetStream, R3
//!   streams). Events are posted round-robin, some twice to different agents; a third of
//!   the way through one agent is killed (SIGKILL), two thirds of the way one NATS node.
//!   Every accepted event ends with exactly one succeeded run, and each surviving agent
//!   shows every one of them.
//! - a run whose agent is killed between steps resumes on another agent after its last
//!   journaled step, and the killed agent, back, does not run it again.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Server, fixture};

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
        Self::start_nodes(3)
    }

    fn start_nodes(count: usize) -> Self {
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
        let clients: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for n in 0..count {
            let others: Vec<String> = (0..count)
                .filter(|m| *m != n)
                .map(|m| format!("nats://127.0.0.1:{}", routes[m]))
                .collect();
            let mut command = Command::new(&binary);
            command
                .args(["--jetstream", "--addr", "127.0.0.1"])
                .args(["--server_name", &format!("n{n}")])
                .args(["--port", &clients[n].to_string()]);
            if count > 1 {
                command
                    .args(["--cluster_name", "deadlift"])
                    .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[n])])
                    .args(["--routes", &others.join(",")]);
            }
            let child = command
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

/// Makes tenant acme on the agent at `base`, with a token, the module `module` (a name
/// and its fixture) and the workflow `orders`; answers the token.
async fn set_up_acme(
    http: &reqwest::Client,
    base: &str,
    module: (&str, &str),
    workflow: String,
) -> String {
    let created = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let token: Value = http
        .post(format!("{base}/v1/tenants/acme/tokens"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let pushed = http
        .post(format!("{base}/v1/modules?name={}", module.0))
        .bearer_auth(&token)
        .body(std::fs::read(fixture(module.1)).unwrap())
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success());
    let applied = http
        .put(format!("{base}/v1/workflows/orders"))
        .bearer_auth(&token)
        .header("content-type", "application/toml")
        .body(workflow)
        .send()
        .await
        .unwrap();
    assert_eq!(
        applied.status().as_u16(),
        200,
        "{}",
        applied.text().await.unwrap()
    );
    token
}

#[test]
fn a_cluster_loses_no_event_when_an_agent_and_a_nats_node_die() {
    let mut nats = NatsCluster::start();
    let urls = nats.urls.join(",");
    let dirs: Vec<_> = (0..3).map(|_| agent_dir()).collect();
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
    let token = runtime.block_on(set_up_acme(
        &http,
        &first,
        ("adder", "add_ten"),
        "trigger = { event = \"orders.created\" }\n[[steps]]\nid = \"add\"\ncall = \"adder\"\n"
            .into(),
    ));
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
    let check = |agents: &[Option<Server>], n: usize| {
        let base = url(agents, n).unwrap();
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
    };
    for n in 0..2 {
        check(&agents, n);
    }
    // The killed agent comes back: it resumes none of the runs it held (their events
    // were taken over), and shows the cluster's runs, none doubled.
    agents[2] = Some(Server::start_with(
        dirs[2].path(),
        &[
            ("DEADLIFT_NATS", &urls),
            ("DEADLIFT_NATS_REPLICAS", "3"),
            ("DEADLIFT_NATS_ACK_WAIT_SECS", "3"),
            ("DEADLIFT_ADMIN_TOKEN", ADMIN),
        ],
    ));
    assert_eq!(agents[2].as_ref().unwrap().resumed, 0);
    check(&agents, 2);
    check(&agents, 0);

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

/// Counts the requests each path gets, answering each with JSON; the first request for
/// `/two` is held until `release` (its caller is killed meanwhile).
struct StepCounter {
    port: u16,
    hits: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
    release: Arc<AtomicBool>,
}

impl StepCounter {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits: Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Arc::default();
        let release = Arc::new(AtomicBool::new(false));
        let (counted, released) = (hits.clone(), release.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (hits, release) = (counted.clone(), released.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    let mut request = String::new();
                    if reader.read_line(&mut request).is_err() {
                        return;
                    }
                    let mut header = String::new();
                    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                        header.clear();
                    }
                    let path = request.split(' ').nth(1).unwrap_or("").to_owned();
                    let seen = {
                        let mut hits = hits.lock().unwrap();
                        let count = hits.entry(path.clone()).or_default();
                        *count += 1;
                        *count
                    };
                    if path == "/two" && seen == 1 {
                        while !release.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    let body = format!("{{\"step\":\"{}\"}}", path.trim_start_matches('/'));
                    let _ = write!(
                        reader.get_mut(),
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        Self {
            port,
            hits,
            release,
        }
    }

    fn hits(&self) -> BTreeMap<String, usize> {
        self.hits.lock().unwrap().clone()
    }
}

/// Polls `check` every 50 ms for up to `seconds`.
fn eventually(seconds: u64, mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..seconds * 20 {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Issue 13: a run whose agent dies between steps resumes on another agent without
/// repeating a journaled step; the dead agent, started again, leaves the run alone.
#[test]
fn a_run_resumes_on_another_agent_after_its_last_journaled_step() {
    take_over_a_run(Stop::Kill);
}

/// An agent told to stop (SIGTERM) hands its events back at once: the run goes on
/// elsewhere long before the 60 s lease would have run out, again without repeating its
/// journaled step.
#[test]
fn an_agent_that_stops_hands_its_runs_over_at_once() {
    take_over_a_run(Stop::Terminate);
}

#[derive(PartialEq)]
enum Stop {
    Kill,
    Terminate,
}

fn take_over_a_run(stop: Stop) {
    let ack_wait = if stop == Stop::Kill { "2" } else { "60" };
    let nats = NatsCluster::start_nodes(1);
    let urls = nats.urls.join(",");
    let counter = StepCounter::start();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[policy.default]\nallowed_hosts = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    let config_path = config.path().to_str().unwrap().to_owned();
    let env = [
        ("DEADLIFT_NATS", urls.as_str()),
        ("DEADLIFT_NATS_ACK_WAIT_SECS", ack_wait),
        ("DEADLIFT_ADMIN_TOKEN", ADMIN),
        ("DEADLIFT_CONFIG", config_path.as_str()),
    ];
    let (first_dir, second_dir) = (agent_dir(), agent_dir());
    let first = Server::start_with(first_dir.path(), &env);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let step = |id: &str| {
        format!(
            "[[steps]]\nid = \"{id}\"\ncall = \"fetcher\"\nfunction = \"fetch\"\ninput = \"{{'url': 'http://127.0.0.1:{}/{id}'}}\"\ngrant = {{ allowed_hosts = [\"127.0.0.1\"] }}\n",
            counter.port
        )
    };
    let workflow = format!(
        "trigger = {{ event = \"orders.created\" }}\n{}{}{}",
        step("one"),
        step("two"),
        step("three")
    );
    let token = runtime.block_on(async {
        let base = &first.url;
        let token = set_up_acme(&http, base, ("fetcher", "fetcher"), workflow).await;
        let posted = http
            .post(format!("{base}/v1/events"))
            .bearer_auth(&token)
            .json(&json!({"specversion": "1.0", "id": "order-1", "source": "/shop", "type": "orders.created", "data": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status().as_u16(), 202);
        token
    });
    // The first agent is in step two: step one is journaled.
    assert!(
        eventually(20, || counter.hits().get("/two") == Some(&1)),
        "step two never started: {:?}",
        counter.hits()
    );
    let second = Server::start_with(second_dir.path(), &env);
    if stop == Stop::Terminate {
        let mut first = first;
        Command::new("kill")
            .args(["-TERM", &first.child.id().to_string()])
            .status()
            .unwrap();
        let exited = eventually(15, || first.child.try_wait().unwrap().is_some());
        assert!(exited, "the first agent did not stop");
    } else {
        drop(first);
    }
    counter.release.store(true, Ordering::Release);

    let runs = |base: &str| -> Vec<Value> {
        runtime.block_on(async {
            let page: Value = http
                .get(format!("{base}/v1/runs"))
                .bearer_auth(&token)
                .query(&[("workflow", "orders")])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or_default();
            page["runs"].as_array().cloned().unwrap_or_default()
        })
    };
    let succeeded = |base: &str| -> Option<Value> {
        let runs = runs(base);
        (runs.len() == 1 && runs[0]["status"] == "succeeded").then(|| runs[0].clone())
    };
    let mut run = None;
    assert!(
        eventually(30, || {
            run = succeeded(&second.url);
            run.is_some()
        }),
        "the second agent did not finish the run: {:?}, hits {:?}",
        runs(&second.url),
        counter.hits()
    );
    let run = run.unwrap();
    let expected: BTreeMap<String, usize> = [("/one", 1), ("/three", 1), ("/two", 2)]
        .into_iter()
        .map(|(path, count)| (path.to_owned(), count))
        .collect();
    // Step two ran twice (the first agent died in it, before journaling it); step one,
    // journaled, never ran again.
    assert_eq!(counter.hits(), expected);
    let detail: Value = runtime.block_on(async {
        http.get(format!(
            "{}/v1/runs/{}",
            second.url,
            run["id"].as_str().unwrap()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
    });
    let steps: Vec<&str> = detail["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["one", "two", "three"], "{detail}");

    // The first agent comes back: it learns the run's end from the cluster and does not
    // resume its own copy.
    let first = Server::start_with(first_dir.path(), &env);
    assert_eq!(first.resumed, 0, "the returning agent resumed a leased run");
    assert!(
        eventually(30, || succeeded(&first.url)
            .is_some_and(|again| again["id"] == run["id"])),
        "the returning agent does not show the run's end: {:?}",
        runs(&first.url)
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(counter.hits(), expected);
    drop(nats);
}

/// Issue 13: a peer that is down gets everything the cluster's agents accepted for it
/// once it is back, delivered by whichever agent holds its outbox lease then: here the
/// one left alive after the other was killed.
#[test]
fn a_peer_that_was_down_gets_everything_from_whichever_agent_is_left() {
    let nats = NatsCluster::start_nodes(1);
    let urls = nats.urls.join(",");
    let env = [
        ("DEADLIFT_NATS", urls.as_str()),
        ("DEADLIFT_NATS_ACK_WAIT_SECS", "2"),
        ("DEADLIFT_ADMIN_TOKEN", ADMIN),
    ];
    let (one_dir, two_dir) = (agent_dir(), agent_dir());
    let cluster_key = deadlift::federation::Identity::load_or_create(one_dir.path(), "deadlift")
        .unwrap()
        .public_key();
    // The partner: another organisation's agent, down while the events are accepted.
    let partner_dir = tempfile::tempdir().unwrap();
    let partner_key = deadlift::federation::Identity::load_or_create(partner_dir.path(), "partner")
        .unwrap()
        .public_key();
    let partner_address = format!("127.0.0.1:{}", free_port());
    let partner_env = [
        ("DEADLIFT_NAME", "partner"),
        ("DEADLIFT_ADMIN_TOKEN", ADMIN),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let send = |request: reqwest::RequestBuilder, body: Value| -> (u16, Value) {
        runtime.block_on(async {
            let response = request.bearer_auth(ADMIN).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        })
    };

    // The partner accepts the cluster's orders and runs a workflow for each.
    let partner = Server::start_on(partner_dir.path(), &partner_address, &partner_env);
    let partner_url = partner.url.clone();
    let (status, _) = send(
        http.post(format!("{partner_url}/v1/peers")),
        json!({"name": "deadlift", "url": "http://127.0.0.1:9", "public_key": cluster_key,
               "tenant": "default", "accept": ["orders.*"]}),
    );
    assert_eq!(status, 201);
    runtime.block_on(async {
        let pushed = http
            .post(format!("{partner_url}/v1/modules?name=adder"))
            .bearer_auth(ADMIN)
            .header("x-deadlift-tenant", "default")
            .body(std::fs::read(fixture("add_ten")).unwrap())
            .send()
            .await
            .unwrap();
        assert!(pushed.status().is_success());
        let applied = http
            .put(format!("{partner_url}/v1/workflows/orders"))
            .bearer_auth(ADMIN)
            .header("x-deadlift-tenant", "default")
            .header("content-type", "application/toml")
            .body("trigger = { event = \"orders.*\" }\n[[steps]]\nid = \"add\"\ncall = \"adder\"\n")
            .send()
            .await
            .unwrap();
        assert_eq!(applied.status().as_u16(), 200);
    });
    drop(partner);

    // Two agents of one cluster; the peer is registered on the first only.
    let mut one = Some(Server::start_with(one_dir.path(), &env));
    let two = Server::start_with(two_dir.path(), &env);
    let first = one.as_ref().unwrap().url.clone();
    let (status, _) = send(
        http.post(format!("{first}/v1/tenants")),
        json!({"name": "acme"}),
    );
    assert_eq!(status, 201);
    let (status, _) = send(
        http.post(format!("{first}/v1/peers")),
        json!({"name": "partner", "url": partner_url, "public_key": partner_key,
               "tenant": "acme", "send": ["orders.*"]}),
    );
    assert_eq!(status, 201);
    assert!(
        eventually(10, || {
            let (status, peers) = send(http.get(format!("{}/v1/peers", two.url)), Value::Null);
            status == 200 && peers.as_array().is_some_and(|p| p.len() == 1)
        }),
        "the peer did not reach the second agent"
    );
    let events = 40;
    for n in 0..events {
        let base = if n % 2 == 0 { &first } else { &two.url };
        let (status, _) = send(
            http.post(format!("{base}/v1/events"))
                .header("x-deadlift-tenant", "acme"),
            json!({"specversion": "1.0", "id": format!("order-{n}"), "source": "/shop",
                   "type": "orders.created", "data": n}),
        );
        assert_eq!(status, 202);
    }
    // Both agents try, and fail, to deliver; then the first dies.
    assert!(
        eventually(20, || {
            let (_, dead_or_retried) = send(
                http.get(format!("{first}/v1/outbox?status=forwarded")),
                Value::Null,
            );
            dead_or_retried
                .as_array()
                .is_some_and(|entries| entries.iter().any(|e| e["last_error"].is_string()))
        }),
        "no failed delivery recorded on the first agent"
    );
    drop(one.take());

    let partner = Server::start_on(partner_dir.path(), &partner_address, &partner_env);
    let received = || -> BTreeMap<String, usize> {
        let (_, page) = runtime.block_on(async {
            let response = http
                .get(format!("{}/v1/runs", partner.url))
                .bearer_auth(ADMIN)
                .header("x-deadlift-tenant", "default")
                .query(&[("workflow", "orders"), ("limit", "500")])
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap_or_default(),
            )
        });
        let mut by_event = BTreeMap::new();
        for run in page["runs"].as_array().cloned().unwrap_or_default() {
            *by_event
                .entry(run["event_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        by_event
    };
    let mut got = BTreeMap::new();
    assert!(
        eventually(60, || {
            got = received();
            got.len() == events
        }),
        "the partner got {} of {events} events: {got:?}",
        got.len()
    );
    assert!(got.values().all(|runs| *runs == 1), "{got:?}");
    // The agent left alive delivered them, and says so (once it has settled them).
    let delivered = || {
        send(
            http.get(format!("{}/v1/outbox?status=delivered&limit=500", two.url)),
            Value::Null,
        )
        .1
        .as_array()
        .map_or(0, Vec::len)
    };
    assert!(
        eventually(10, || delivered() == events),
        "the second agent recorded {} deliveries",
        delivered()
    );
    drop(nats);
}
