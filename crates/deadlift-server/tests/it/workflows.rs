//! Workflows, events and durable runs over real HTTP: every step kind, conditions, a
//! graph with a join, retries, dead letters and replay, event deduplication, a schedule,
//! cancellation, the live run stream, retention, and the Deadlift v1 workflow routes.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::fixture;
use crate::common::server::{ADMIN, TestAgent};

/// A client acting for the `default` tenant with the admin token.
struct Client<'a> {
    agent: &'a TestAgent,
    tenant: &'static str,
}

impl<'a> Client<'a> {
    fn new(agent: &'a TestAgent) -> Self {
        Self::for_tenant(agent, "default")
    }

    /// The admin, acting for `tenant`.
    fn for_tenant(agent: &'a TestAgent, tenant: &'static str) -> Self {
        Self { agent, tenant }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.agent
            .http
            .request(method, self.agent.url(path))
            .bearer_auth(ADMIN)
            .header("x-deadlift-tenant", self.tenant)
    }

    async fn push(&self, name: &str, fixture_name: &str) {
        let response = self
            .request(Method::POST, "/v1/modules")
            .query(&[("name", name)])
            .body(fixture(fixture_name))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201);
    }

    async fn apply(&self, name: &str, toml: &str) -> reqwest::Response {
        self.request(Method::PUT, &format!("/v1/workflows/{name}"))
            .header("content-type", "application/toml")
            .body(toml.to_owned())
            .send()
            .await
            .unwrap()
    }

    async fn applied(&self, name: &str, toml: &str) -> Value {
        let response = self.apply(name, toml).await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Starts a run and waits for it; returns the finished run.
    async fn run(&self, workflow: &str, input: Value) -> Value {
        let response = self
            .request(Method::POST, &format!("/v1/workflows/{workflow}/runs"))
            .query(&[("wait", "true")])
            .json(&input)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        response.json().await.unwrap()
    }

    /// POSTs with no body.
    async fn post(&self, path: &str) -> reqwest::Response {
        self.request(Method::POST, path).send().await.unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        let response = self.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        response.json().await.unwrap()
    }

    async fn publish(&self, event: Value) -> Value {
        let response = self
            .request(Method::POST, "/v1/events")
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        response.json().await.unwrap()
    }

    /// Polls until `path` lists runs matching `done`, or fails after 10 s.
    async fn runs_until(&self, query: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..200 {
            let page = self.get(&format!("/v1/runs?{query}")).await;
            let runs = page["runs"].as_array().unwrap().clone();
            if done(&runs) {
                return runs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("runs matching {query} never reached the expected state");
    }

    async fn run_by_id(&self, id: &str) -> Value {
        self.get(&format!("/v1/runs/{id}")).await
    }
}

fn event(id: &str, event_type: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/tests", "type": event_type, "data": data})
}

fn finished(runs: &[Value]) -> bool {
    !runs.is_empty()
        && runs
            .iter()
            .all(|r| ["succeeded", "failed", "cancelled"].contains(&r["status"].as_str().unwrap()))
}

#[tokio::test]
async fn a_pipeline_calls_modules_checks_conditions_and_emits_events_that_start_other_workflows() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("add-ten", "add_ten").await;
    client.push("times-five", "multiply_by_five").await;
    let applied = client
        .applied(
            "calc",
            r#"
            [[steps]]
            id = "add"
            call = "add-ten"
            [[steps]]
            id = "times"
            if = "steps.add.output > 12"
            call = "times-five"
            [[steps]]
            id = "announce"
            emit = { type = "math.done", data = "{'result': input, 'original': steps.add.output}" }
            "#,
        )
        .await;
    assert_eq!(applied["version"], 1);
    client
        .applied(
            "listener",
            r#"
            trigger = { event = "math.*" }
            [[steps]]
            id = "double"
            input = "input.result"
            call = "add-ten"
            "#,
        )
        .await;

    let run = client.run("calc", json!(5)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], 75, "the emit step passes its input on");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0]["output"], 15);
    assert_eq!(steps[1]["status"], "succeeded");
    assert_eq!(steps[2]["input"], 75);
    assert!(steps[0]["module"].as_str().unwrap().starts_with("sha256:"));
    let emitted = steps[2]["emitted"][0].as_str().unwrap().to_owned();

    // The emitted event went through the inbox and started `listener` in the same trace.
    let listened = client
        .runs_until(&format!("event_id={emitted}"), finished)
        .await;
    let listener = client.run_by_id(listened[0]["id"].as_str().unwrap()).await;
    assert_eq!(listener["workflow"], "listener");
    assert_eq!(listener["input"], json!({"result": 5, "original": 15}));
    assert_eq!(listener["output"], 15);
    assert_eq!(listener["trace_id"], run["trace_id"]);
    let trace = run["trace_id"].as_str().unwrap();
    let same_trace = client.get(&format!("/v1/runs?trace_id={trace}")).await;
    assert_eq!(
        same_trace["runs"].as_array().unwrap().len(),
        2,
        "{same_trace}"
    );

    // A false condition skips the step and passes its input through.
    let run = client.run("calc", json!(1)).await;
    assert_eq!(run["steps"][1]["status"], "skipped");
    assert_eq!(run["output"], 11);
    agent.stop().await;
}

#[tokio::test]
async fn events_a_module_emits_commit_with_its_step_and_start_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("emitter", "emitter").await;
    client.push("add-ten", "add_ten").await;
    client
        .applied(
            "announcer",
            r#"
            [[steps]]
            id = "say"
            call = "emitter"
            function = "emit_event"
            input = "{'type': 'chain.next', 'data': input}"
            grant = { host_functions = ["emit"] }
            "#,
        )
        .await;
    client
        .applied(
            "chained",
            "trigger = { event = \"chain.next\" }\n[[steps]]\nid = \"add\"\ncall = \"add-ten\"\n",
        )
        .await;
    let run = client.run("announcer", json!(32)).await;
    assert_eq!(run["output"], json!({"emitted": "chain.next"}));
    let emitted = run["steps"][0]["emitted"][0].as_str().unwrap().to_owned();
    let chained = client
        .runs_until(&format!("event_id={emitted}"), finished)
        .await;
    let chained = client.run_by_id(chained[0]["id"].as_str().unwrap()).await;
    assert_eq!(chained["output"], 42);
    assert_eq!(chained["trace_id"], run["trace_id"]);
    assert_eq!(chained["event"]["deadliftdepth"], 1);

    // Outside a run (an embedder's own call), `emit` goes through the same durable inbox.
    let engine = agent.agent.engine();
    let emitter = engine.registry().resolve("default", "emitter").unwrap().id;
    engine
        .call(
            &emitter,
            "emit_event",
            br#"{"type": "chain.next", "data": 1}"#,
            &deadlift_engine::Grant::default().allow(["emit"]),
            &deadlift_engine::CallContext::new("default"),
        )
        .await
        .unwrap();
    let chained = client
        .runs_until("workflow=chained", |r| r.len() == 2 && finished(r))
        .await;
    assert_eq!(
        client.run_by_id(chained[0]["id"].as_str().unwrap()).await["output"],
        11
    );

    // A step whose grant lacks `emit` is refused when applied, naming the import.
    let refused = client
        .apply(
            "ungranted",
            "[[steps]]\nid = \"say\"\ncall = \"emitter\"\nfunction = \"emit_event\"\n",
        )
        .await;
    let message = TestAgent::expect_error(refused, 400, "workflow_invalid").await;
    assert!(
        message.contains("steps[0].grant.host_functions") && message.contains("emit"),
        "{message}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_null_output_ends_a_pipeline_successfully() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("echo", "echo").await;
    client.push("add-ten", "add_ten").await;
    client
        .applied(
            "stops",
            r#"
            [[steps]]
            id = "first"
            call = "echo"
            function = "echo"
            [[steps]]
            id = "never"
            call = "add-ten"
            "#,
        )
        .await;
    let run = client.run("stops", Value::Null).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["output"], Value::Null);
    assert_eq!(run["steps"].as_array().unwrap().len(), 1);
    agent.stop().await;
}

/// Issue 12: a condition iterating 10^7 times froze the HTTP server. It now fails its
/// run with a typed code once over its budget, and the agent keeps answering.
#[tokio::test]
async fn an_expression_over_its_budget_fails_the_run_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("echo", "echo").await;
    let hundred = format!(
        "[{}]",
        (0..100)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let condition =
        format!("{hundred}.all(a, {hundred}.all(b, {hundred}.all(c, {hundred}.all(d, true))))");
    client
        .applied(
            "costly",
            &format!(
                r#"
                [[steps]]
                id = "guarded"
                call = "echo"
                function = "echo"
                if = "{condition}"
                "#
            ),
        )
        .await;
    let run = client.run("costly", json!(1)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"]["code"], "expression_budget_exceeded", "{run}");
    let health = agent.http.get(agent.url("/healthz")).send().await.unwrap();
    assert!(health.status().is_success());
    agent.stop().await;
}

#[tokio::test]
async fn a_graph_runs_independent_steps_and_feeds_a_join() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("add-ten", "add_ten").await;
    client.push("times-five", "multiply_by_five").await;
    client
        .applied(
            "graph",
            r#"
            [[steps]]
            id = "plus"
            call = "add-ten"
            [[steps]]
            id = "times"
            call = "times-five"
            [[steps]]
            id = "join"
            needs = ["plus", "times"]
            input = "steps.plus.output + steps.times.output"
            call = "add-ten"
            "#,
        )
        .await;
    let run = client.run("graph", json!(5)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // (5 + 10) + (5 * 5) + 10
    assert_eq!(run["output"], 50);
    let ids: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[2], "join");
    agent.stop().await;
}

const FLAKY: &str = r#"
[[steps]]
id = "try"
call = "flaky"
function = "attempt"
grant = { host_functions = ["kv_get", "kv_set"] }
retry = { attempts = 3, initial_ms = 5, max_ms = 20, retry_on = ["guest"] }
"#;

#[tokio::test]
async fn a_failing_step_is_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("flaky", "flaky").await;
    client.applied("flaky", FLAKY).await;
    let run = client
        .run("flaky", json!({"key": "a", "fail_times": 2, "value": "ok"}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!({"attempts": 3, "value": "ok"}));
    let step = &run["steps"][0];
    assert_eq!(step["attempts"], 3);
    assert_eq!(step["attempt_errors"].as_array().unwrap().len(), 2);
    assert_eq!(step["attempt_errors"][0]["kind"], "guest");

    // Guest errors are not retried unless the policy says so.
    client
        .applied(
            "strict",
            &FLAKY.replace("retry_on = [\"guest\"]", "retry_on = [\"timeout\"]"),
        )
        .await;
    let run = client
        .run("strict", json!({"key": "b", "fail_times": 1}))
        .await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["steps"][0]["attempts"], 1);
    assert_eq!(run["error"]["code"], "guest_error");
    assert_eq!(run["error"]["step"], "try");
    agent.stop().await;
}

#[tokio::test]
async fn a_run_that_exhausts_its_retries_is_dead_lettered_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("flaky", "flaky").await;
    client
        .applied(
            "flaky",
            &format!("trigger = {{ event = \"orders.created\" }}\n{FLAKY}"),
        )
        .await;
    let published = client
        .publish(event(
            "order-1",
            "orders.created",
            json!({"key": "order-1", "fail_times": 4}),
        ))
        .await;
    let run_id = published["events"][0]["runs"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let runs = client.runs_until("event_id=order-1", finished).await;
    assert_eq!(runs[0]["status"], "failed");

    let letters = client.get("/v1/dead-letters").await;
    let letter = &letters.as_array().unwrap()[0];
    assert_eq!(letter["run_id"], run_id.as_str());
    assert_eq!(letter["event_id"], "order-1");
    assert_eq!(letter["error"]["code"], "guest_error");

    // Replay: attempts 4 (fails) and 5 (succeeds) on the same run.
    let replayed = client
        .request(
            Method::POST,
            &format!("/v1/dead-letters/{}/replay", letter["id"]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status().as_u16(), 202);
    let runs = client
        .runs_until("event_id=order-1", |runs| {
            runs.first().is_some_and(|r| r["status"] == "succeeded")
        })
        .await;
    assert_eq!(runs.len(), 1, "a replay reruns the same run");
    let run = client.run_by_id(&run_id).await;
    assert_eq!(run["output"]["attempts"], 5);
    assert!(
        client
            .get("/v1/dead-letters")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A succeeded run cannot be retried.
    let again = client.post(&format!("/v1/runs/{run_id}/retry")).await;
    TestAgent::expect_error(again, 409, "run_not_retryable").await;
    agent.stop().await;
}

#[tokio::test]
async fn the_same_event_id_never_starts_a_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("add-ten", "add_ten").await;
    client
        .applied(
            "adder",
            "trigger = { event = \"numbers.>\" }\n[[steps]]\nid = \"add\"\ncall = \"add-ten\"\n",
        )
        .await;
    let first = client
        .publish(event("n-1", "numbers.in.new", json!(1)))
        .await;
    assert_eq!(first["events"][0]["duplicate"], false);
    assert_eq!(first["events"][0]["runs"].as_array().unwrap().len(), 1);
    let second = client
        .publish(event("n-1", "numbers.in.new", json!(1)))
        .await;
    assert_eq!(second["ids"], json!(["n-1"]));
    assert_eq!(second["events"][0]["duplicate"], true);
    // In a batch too.
    let batch = client
        .request(Method::POST, "/v1/events")
        .header("content-type", "application/cloudevents-batch+json")
        .body(
            json!([
                event("n-1", "numbers.x", json!(1)),
                event("n-2", "numbers.x", json!(2))
            ])
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let batch: Value = batch.json().await.unwrap();
    assert_eq!(batch["events"][0]["duplicate"], true);
    assert_eq!(batch["events"][1]["duplicate"], false);
    let runs = client
        .runs_until("workflow=adder", |r| r.len() >= 2 && finished(r))
        .await;
    assert_eq!(runs.len(), 2);
    // Paging: one at a time, newest first.
    let first = client.get("/v1/runs?workflow=adder&limit=1").await;
    let next = first["next"].as_i64().unwrap();
    let second = client
        .get(&format!("/v1/runs?workflow=adder&limit=1&before={next}"))
        .await;
    assert_eq!(second["runs"][0]["id"], runs[1]["id"]);
    assert_ne!(first["runs"][0]["id"], second["runs"][0]["id"]);
    // Not matching: no run.
    let other = client.publish(event("o-1", "letters.new", json!(1))).await;
    assert!(other["events"][0]["runs"].as_array().unwrap().is_empty());
    // The journal's counters are on /metrics (counted just after each commit).
    for _ in 0..100 {
        if metric(&agent, "deadlift_runs_succeeded_total").await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&agent, "deadlift_events_duplicate_total").await, 2);
    assert_eq!(metric(&agent, "deadlift_events_stored_total").await, 3);
    assert_eq!(metric(&agent, "deadlift_runs_started_total").await, 2);
    assert_eq!(metric(&agent, "deadlift_runs_succeeded_total").await, 2);
    agent.stop().await;
}

#[tokio::test]
async fn a_schedule_starts_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("echo", "echo").await;
    client
        .applied(
            "ticker",
            "trigger = { schedule = \"* * * * * *\" }\n[[steps]]\nid = \"e\"\ncall = \"echo\"\nfunction = \"echo\"\n",
        )
        .await;
    let runs = client
        .runs_until("workflow=ticker&status=succeeded", |r| !r.is_empty())
        .await;
    let run = client.run_by_id(runs[0]["id"].as_str().unwrap()).await;
    assert_eq!(run["trigger"], "schedule");
    assert_eq!(run["output"]["workflow"], "ticker");
    // Deleting the workflow stops the schedule: no firing is stored (the scheduler
    // fires every second) and no run starts, over more than two seconds.
    let deleted = client
        .request(Method::DELETE, "/v1/workflows/ticker")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    let runs_after_delete = ticker_runs(&client).await;
    let fired_after_delete = metric(&agent, "deadlift_events_stored_total").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        metric(&agent, "deadlift_events_stored_total").await,
        fired_after_delete
    );
    assert_eq!(ticker_runs(&client).await, runs_after_delete);
    agent.stop().await;
}

#[tokio::test]
async fn running_and_queued_runs_can_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    // One run at a time, so the second run waits in the queue.
    let agent = TestAgent::start_with(dir.path(), |b| b.max_concurrent_runs(1)).await;
    let client = Client::new(&agent);
    client.push("looper", "looper").await;
    client.push("echo", "echo").await;
    client
        .applied(
            "forever",
            r#"
            [[steps]]
            id = "spin"
            if = "input == 'spin'"
            call = "looper"
            function = "loop_forever"
            timeout_ms = 60000
            [[steps]]
            id = "done"
            call = "echo"
            function = "echo"
            "#,
        )
        .await;
    let api = &client;
    let start = |input: &'static str| async move {
        let started: Value = api
            .request(Method::POST, "/v1/workflows/forever/runs")
            .json(&input)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        started["run_id"].as_str().unwrap().to_owned()
    };
    let first = start("spin").await;
    client
        .runs_until("workflow=forever&status=running", |r| !r.is_empty())
        .await;
    // Quick if it ever ran: its steps would be journaled at once.
    let second = start("quick").await;
    for id in [&second, &first] {
        let cancelled = client.post(&format!("/v1/runs/{id}/cancel")).await;
        assert_eq!(cancelled.status().as_u16(), 202);
    }
    for id in [&first, &second] {
        assert_eq!(client.run_by_id(id).await["status"], "cancelled");
    }
    // The queued run never started its step, even once the slot was free.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second_run = client.run_by_id(&second).await;
    assert!(
        second_run["steps"].as_array().unwrap().is_empty(),
        "{second_run}"
    );
    let again = client.post(&format!("/v1/runs/{first}/cancel")).await;
    TestAgent::expect_error(again, 409, "run_not_open").await;
    agent.stop().await;
}

/// Issue 11: a run cancelled while its step waited to retry, then retried, was lost:
/// the retry found the first execution's cancelled token and stopped, and the first
/// execution, waking from its back-off, marked the run failed.
#[tokio::test]
async fn retry_after_cancel_during_backoff_runs_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("flaky", "flaky").await;
    client
        .applied(
            "patient",
            &FLAKY.replace(
                "initial_ms = 5, max_ms = 20,",
                "initial_ms = 1500, max_ms = 1500, jitter = false,",
            ),
        )
        .await;
    let started: Value = client
        .request(Method::POST, "/v1/workflows/patient/runs")
        .json(&json!({"key": "cancel-retry", "fail_times": 1, "value": "ok"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["run_id"].as_str().unwrap().to_owned();
    // The first attempt fails at once; the step then waits 1.5 s to try again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled = client.post(&format!("/v1/runs/{id}/cancel")).await;
    assert_eq!(cancelled.status().as_u16(), 202);
    let retried = client.post(&format!("/v1/runs/{id}/retry")).await;
    assert_eq!(retried.status().as_u16(), 202);
    let mut run = Value::Null;
    for _ in 0..100 {
        run = client.run_by_id(&id).await;
        if run["status"] != "queued" && run["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!({"attempts": 2, "value": "ok"}));
    // The first execution wakes from its back-off after this: it must change nothing.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let later = client.run_by_id(&id).await;
    assert_eq!(later["status"], "succeeded", "{later}");
    assert_eq!(later["output"], run["output"]);
    agent.stop().await;
}

/// Issue 11: a bare module name resolved to the newest upload whatever its version,
/// so anyone who could upload under the name changed what a workflow ran. An upload
/// now changes nothing, applied again or not; a promotion (issue 15) moves the name.
#[tokio::test]
async fn a_workflow_version_runs_the_module_it_was_applied_with() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("adder", "add_ten").await;
    let applied = client
        .applied("pinned", "[[steps]]\nid = \"add\"\ncall = \"adder\"\n")
        .await;
    let add_ten = applied["spec"]["steps"][0]["pinned"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(add_ten.starts_with("sha256:"), "{applied}");
    // Other bytes under the same name, as a newer version.
    agent
        .agent
        .engine()
        .add_module(
            "default",
            deadlift_engine::NewModule {
                name: "adder".into(),
                version: Some("2.0".into()),
                bytes: fixture("multiply_by_five"),
                ..deadlift_engine::NewModule::default()
            },
        )
        .unwrap();
    let run = client.run("pinned", json!(5)).await;
    assert_eq!(run["output"], json!(15), "{run}");
    assert_eq!(run["steps"][0]["module"], add_ten.as_str());
    // Applying again changes nothing either: the name still means its live version.
    client
        .applied("pinned", "[[steps]]\nid = \"add\"\ncall = \"adder\"\n")
        .await;
    let run = client.run("pinned", json!(5)).await;
    assert_eq!(run["output"], json!(15), "{run}");
    // Promoting version 2.0 moves the name, and with it the workflow.
    let promoted = client
        .request(Method::POST, "/v1/modules/adder/promote")
        .json(&json!({"version": "2.0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(promoted.status().as_u16(), 200);
    let run = client.run("pinned", json!(5)).await;
    assert_eq!(run["output"], json!(25), "{run}");
    assert_eq!(run["steps"][0]["version"], "2.0", "{run}");
    agent.stop().await;
}

/// Issue 11: the same for hook bindings: a call runs the module the binding resolved to
/// when it was made.
#[tokio::test]
async fn a_hook_binding_runs_the_module_it_was_bound_to() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| {
        b.hook(deadlift_agent::hooks::HookDecl::new(
            "before_charge",
            deadlift_engine::Grant::default(),
        ))
    })
    .await;
    let client = Client::new(&agent);
    client.push("adder", "add_ten").await;
    let bound = client
        .request(Method::PUT, "/v1/hooks/before_charge/binding")
        .json(&json!({"module": "adder", "function": "_main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bound.status().as_u16(), 204);
    agent
        .agent
        .engine()
        .add_module(
            "default",
            deadlift_engine::NewModule {
                name: "adder".into(),
                version: Some("2.0".into()),
                bytes: fixture("multiply_by_five"),
                ..deadlift_engine::NewModule::default()
            },
        )
        .unwrap();
    let called = agent
        .agent
        .hook("before_charge")
        .call("default", json!(5))
        .await
        .unwrap();
    assert_eq!(called.output, json!(15));
    agent.stop().await;
}

/// Issue 11: tenants chose their own workflow grants with no ceiling: runs without a
/// deadline, loopback reachable, the embedder's host functions granted anywhere.
#[tokio::test]
async fn a_workflow_grant_over_the_policy_is_refused_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("flaky", "flaky").await;
    let refused = client
        .apply(
            "greedy",
            r#"
            [[steps]]
            id = "try"
            call = "flaky"
            function = "attempt"
            grant = { host_functions = ["kv_get", "kv_set"], timeout_ms = 18446744073709551615, allowed_hosts = ["127.0.0.1"], max_var_bytes = 18446744073709551615 }
            "#,
        )
        .await;
    assert_eq!(refused.status().as_u16(), 400);
    let body: Value = refused.json().await.unwrap();
    let fields: Vec<&str> = body["error"]["details"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for field in [
        "steps[0].grant.timeout_ms",
        "steps[0].grant.max_var_bytes",
        "steps[0].grant.allowed_hosts",
    ] {
        assert!(fields.contains(&field), "{field} in {body}");
    }
    agent.stop().await;
}

/// A policy tightened after a workflow was applied holds for its next runs, and the
/// run says what was narrowed.
#[tokio::test]
async fn a_tightened_policy_clamps_the_grants_of_applied_workflows() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("flaky", "flaky").await;
    client.applied("flaky", FLAKY).await;
    let mut policy: Value = client.get("/v1/policy").await;
    policy["default"]["host_functions"] = json!(["emit"]);
    let replaced = client
        .request(Method::PUT, "/v1/policy")
        .json(&policy)
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.status().as_u16(), 200);
    let run = client
        .run("flaky", json!({"key": "clamped", "fail_times": 0}))
        .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"]["code"], "host_function_denied");
    assert_eq!(run["steps"][0]["clamped"], json!(["host_functions"]));
    // Tenants cannot read or change the policy.
    let tenant = client
        .request(Method::POST, "/v1/tenants")
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(tenant.status().as_u16(), 201);
    let token: Value = client
        .request(Method::POST, "/v1/tenants/acme/tokens")
        .json(&json!({"description": "acme"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap();
    for method in [Method::GET, Method::PUT] {
        let denied = agent
            .http
            .request(method, agent.url("/v1/policy"))
            .bearer_auth(token)
            .json(&policy)
            .send()
            .await
            .unwrap();
        TestAgent::expect_error(denied, 403, "forbidden").await;
    }
    // Limits for a tenant that could not exist are refused, not kept.
    policy["tenants"] = json!({"": policy["default"].clone()});
    let nameless = agent
        .http
        .put(agent.url("/v1/policy"))
        .bearer_auth(ADMIN)
        .json(&policy)
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(nameless, 400, "invalid_input").await;
    agent.stop().await;
}

#[tokio::test]
async fn bad_documents_are_refused_with_every_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("add-ten", "add_ten").await;
    let response = client
        .apply(
            "bad",
            r#"
            trigger = { schedule = "often" }
            [[steps]]
            id = "a"
            call = "no-such-module"
            [[steps]]
            id = "b"
            call = "add-ten"
            function = "nope"
            grant = { host_functions = ["teleport"] }
            [[steps]]
            id = "c"
            if = "input >"
            emit = { type = "x" }
            "#,
        )
        .await;
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "workflow_invalid");
    let fields: Vec<&str> = body["error"]["details"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for expected in [
        "trigger.schedule",
        "steps[0].call",
        "steps[1].function",
        "steps[1].grant.host_functions",
        "steps[2].if",
    ] {
        assert!(fields.contains(&expected), "{expected} not in {fields:?}");
    }
    // Syntax errors and a name that differs from the route's.
    let response = client.apply("bad", "steps = 3").await;
    TestAgent::expect_error(response, 400, "workflow_invalid").await;
    let response = client
        .apply(
            "one",
            "name = \"two\"\n[[steps]]\nid = \"a\"\ncall = \"add-ten\"\n",
        )
        .await;
    TestAgent::expect_error(response, 400, "workflow_invalid").await;
    let missing = client
        .request(Method::GET, "/v1/workflows/nope")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(missing, 404, "workflow_not_found").await;
    let bad_event = client
        .request(Method::POST, "/v1/events")
        .header("content-type", "application/json")
        .body(r#"{"specversion":"1.0","id":"x","source":"s","type":"a..b"}"#)
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(bad_event, 400, "event_invalid").await;
    agent.stop().await;
}

#[tokio::test]
async fn applying_again_makes_a_new_version_and_runs_record_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("add-ten", "add_ten").await;
    client.push("times-five", "multiply_by_five").await;
    let doc = "[[steps]]\nid = \"a\"\ncall = \"add-ten\"\n";
    client.applied("w", doc).await;
    let first = client.run("w", json!(1)).await;
    let second_doc = doc.replace("add-ten", "times-five");
    assert_eq!(client.applied("w", &second_doc).await["version"], 2);
    let second = client.run("w", json!(1)).await;
    assert_eq!(
        (first["workflow_version"].clone(), first["output"].clone()),
        (json!(1), json!(11))
    );
    assert_eq!(
        (second["workflow_version"].clone(), second["output"].clone()),
        (json!(2), json!(5))
    );
    // A module a workflow calls cannot be deleted.
    let refused = client
        .request(Method::DELETE, "/v1/modules/times-five")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(refused, 409, "module_in_use").await;
    let listed = client.get("/v1/workflows").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn the_live_stream_shows_runs_as_they_finish() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("add-ten", "add_ten").await;
    client
        .applied("w", "[[steps]]\nid = \"a\"\ncall = \"add-ten\"\n")
        .await;
    let mut stream = client
        .request(Method::GET, "/v1/runs/live")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let run = client.run("w", json!(1)).await;
    let mut seen = String::new();
    while !seen.contains("\"status\":\"succeeded\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("an update within 10 s")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: run"), "{seen}");
    assert!(seen.contains(run["id"].as_str().unwrap()), "{seen}");
    drop(stream);
    agent.stop().await;
}

#[tokio::test]
async fn retention_bounds_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("add-ten", "add_ten").await;
    client
        .applied("w", "[[steps]]\nid = \"a\"\ncall = \"add-ten\"\n")
        .await;
    for n in 0..5 {
        client.run("w", json!(n)).await;
    }
    let (runs, _) = agent
        .agent
        .workflows()
        .prune(deadlift_agent::workflow::Retention {
            max_age_ms: None,
            max_runs_per_tenant: Some(2),
            dedupe_window_ms: 0,
        })
        .await
        .unwrap();
    assert_eq!(runs, 3);
    let left = client.get("/v1/runs").await;
    let outputs: Vec<&Value> = left["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["workflow_version"])
        .collect();
    assert_eq!(outputs.len(), 2, "the two newest runs stay");
    agent.stop().await;
}

async fn v1_upload(agent: &TestAgent, fixture_name: &str, subject: &str) -> String {
    let form = reqwest::multipart::Form::new()
        .part(
            "binary",
            reqwest::multipart::Part::bytes(fixture(fixture_name)).file_name("m.wasm"),
        )
        .text("title", fixture_name.to_owned())
        .text("subject", subject.to_owned());
    let response = agent
        .http
        .post(agent.url("/api/v1/modules"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    response.text().await.unwrap()
}

const ADD_TEN: &str = "deadlift.modules.ingest.add-ten";
const TIMES_FIVE: &str = "deadlift.modules.multiply-by-five";

#[tokio::test]
async fn v1_workflows_execute_as_pipelines_and_are_recorded_as_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    v1_upload(&agent, "add_ten", ADD_TEN).await;
    v1_upload(&agent, "multiply_by_five", TIMES_FIVE).await;
    let created = agent
        .http
        .post(agent.url("/api/v1/workflows"))
        .json(&json!({"name": "calc", "pipeline": [ADD_TEN, TIMES_FIVE]}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let id: i64 = created.text().await.unwrap().parse().unwrap();
    for _ in 0..2 {
        let executed = agent
            .http
            .post(agent.url(&format!("/api/v1/workflows/{id}/execute")))
            .header("content-type", "application/json")
            .body("5")
            .send()
            .await
            .unwrap();
        assert_eq!(executed.status().as_u16(), 200);
        assert_eq!(executed.json::<Value>().await.unwrap(), json!(75));
    }
    // The v1 routes act for a tenant of their own.
    let client = Client::for_tenant(&agent, deadlift_agent::V1_TENANT);
    // Recorded just after the answer.
    let runs = client
        .runs_until("workflow=v1-workflow-1", |r| r.len() == 2)
        .await;
    assert_eq!(runs[0]["trigger"], "v1");
    let run = client.run_by_id(runs[0]["id"].as_str().unwrap()).await;
    assert_eq!(run["steps"].as_array().unwrap().len(), 2);

    // The event trigger: an event of the first module's subject runs from the second.
    let published = client.publish(event("v1-e", ADD_TEN, json!(15))).await;
    let run_id = published["events"][0]["runs"][0]
        .as_str()
        .unwrap()
        .to_owned();
    client.runs_until("event_id=v1-e", finished).await;
    let run = client.run_by_id(&run_id).await;
    assert_eq!(run["output"], 75);
    assert_eq!(run["steps"][0]["status"], "skipped");

    // Errors as the contract says.
    let post = |body: Value| {
        agent
            .http
            .post(agent.url("/api/v1/workflows"))
            .json(&body)
            .send()
    };
    let unknown = post(json!({"name": "x", "pipeline": ["no.such.subject"]}))
        .await
        .unwrap();
    let message = TestAgent::expect_error(unknown, 400, "subject_unknown").await;
    assert!(message.contains("no.such.subject"));
    let empty = post(json!({"name": "x", "pipeline": []})).await.unwrap();
    TestAgent::expect_error(empty, 400, "pipeline_empty").await;
    let missing = agent
        .http
        .post(agent.url("/api/v1/workflows/999/execute"))
        .body("5")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(missing, 404, "workflow_not_found").await;
    let bad_input = agent
        .http
        .post(agent.url(&format!("/api/v1/workflows/{id}/execute")))
        .body("\"five\"")
        .send()
        .await
        .unwrap();
    let message = TestAgent::expect_error(bad_input, 422, "guest_error").await;
    assert!(message.contains("expected a JSON number"), "{message}");
    agent.stop().await;
}

/// A counter from the agent's `/metrics`.
async fn metric(agent: &TestAgent, name: &str) -> u64 {
    let metrics = agent.metrics().await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
}

async fn ticker_runs(client: &Client<'_>) -> usize {
    let page = client.get("/v1/runs?workflow=ticker&limit=500").await;
    page["runs"].as_array().unwrap().len()
}

/// Issue 14: binary-mode CloudEvents and empty batches were refused; a `traceparent`
/// header was ignored; a later-version or upper-case `traceparent` failed the event.
#[tokio::test]
async fn events_arrive_in_binary_mode_and_carry_the_requests_trace() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let client = Client::new(&agent);
    client.push("add-ten", "add_ten").await;
    client
        .applied(
            "bin",
            r#"
            [trigger]
            event = "bin.*"
            [[steps]]
            id = "add"
            call = "add-ten"
            "#,
        )
        .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let binary = client
        .request(Method::POST, "/v1/events")
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", "bin-1")
        .header("ce-source", "/tests")
        .header("ce-type", "bin.created")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body("5")
        .send()
        .await
        .unwrap();
    assert_eq!(binary.status().as_u16(), 202);
    let runs = client.runs_until("event_id=bin-1", finished).await;
    assert_eq!(runs[0]["status"], "succeeded", "{runs:?}");
    assert_eq!(runs[0]["trace_id"], trace);
    let run = client.run_by_id(runs[0]["id"].as_str().unwrap()).await;
    assert_eq!(run["output"], 15);

    // A later version is understood by its first fields; upper case restarts the trace.
    let later = format!("cc-{trace}-00f067aa0ba902b7-01-more");
    let mut with_later = event("bin-2", "bin.created", json!(1));
    with_later["traceparent"] = json!(later);
    client.publish(with_later).await;
    let mut upper = event("bin-3", "bin.created", json!(1));
    upper["traceparent"] = json!(format!("00-{}-00f067aa0ba902b7-01", trace.to_uppercase()));
    client.publish(upper).await;
    let later_run = client.runs_until("event_id=bin-2", finished).await;
    assert_eq!(later_run[0]["trace_id"], trace);
    let restarted = client.runs_until("event_id=bin-3", finished).await;
    assert_ne!(restarted[0]["trace_id"], trace);

    let empty = client
        .request(Method::POST, "/v1/events")
        .header("content-type", "application/cloudevents-batch+json")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status().as_u16(), 202);
    agent.stop().await;
}
