//! The Deadlift v1 routes over real HTTP, row by row of `docs/v1-api.md`.

use reqwest::multipart::{Form, Part};

use deadlift_agent::{DEFAULT_TENANT, V1_TENANT, V1Access};
use deadlift_engine::NewModule;

use crate::common::fixture;
use crate::common::server::{ADMIN, TestAgent};

fn form(binary: Vec<u8>, title: &str, subject: &str) -> Form {
    Form::new()
        .part("binary", Part::bytes(binary).file_name("module.wasm"))
        .text("title", title.to_owned())
        .text("subject", subject.to_owned())
        .text("description", "test module")
}

async fn upload(agent: &TestAgent, form: Form) -> reqwest::Response {
    agent
        .http
        .post(agent.url("/api/v1/modules"))
        .multipart(form)
        .send()
        .await
        .unwrap()
}

async fn execute(agent: &TestAgent, hash: &str, body: &str) -> reqwest::Response {
    agent
        .http
        .post(agent.url(&format!("/api/v1/modules/{hash}/execute")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// What the original calculator example does, twice against the same agent.
#[tokio::test]
async fn calculator_example_runs_twice() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let status = agent.http.get(agent.url("/status")).send().await.unwrap();
    assert_eq!(status.status().as_u16(), 204);
    for _ in 0..2 {
        let add = upload(
            &agent,
            form(
                fixture("add_ten"),
                "Add ten",
                "deadlift.modules.ingest.add-ten",
            ),
        )
        .await;
        assert_eq!(add.status().as_u16(), 201);
        let add_hash = add.text().await.unwrap();
        assert_eq!(add_hash.len(), 64);
        let times = upload(
            &agent,
            form(
                fixture("multiply_by_five"),
                "Times five",
                "deadlift.modules.multiply-by-five",
            ),
        )
        .await;
        assert_eq!(times.status().as_u16(), 201);
        let times_hash = times.text().await.unwrap();

        let out = execute(&agent, &add_hash, "5").await;
        assert_eq!(out.status().as_u16(), 200);
        assert_eq!(out.text().await.unwrap(), "15");
        let out = execute(&agent, &times_hash, "5").await;
        assert_eq!(out.text().await.unwrap(), "25");

        let list: serde_json::Value = agent
            .http
            .get(agent.url("/api/v1/modules"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 2);
        let add_entry = list
            .iter()
            .find(|m| m["hash"] == add_hash.as_str())
            .unwrap();
        assert_eq!(add_entry["title"], "Add ten");
        assert_eq!(add_entry["subject"], "deadlift.modules.ingest.add-ten");
        assert_eq!(add_entry["description"], "test module");
        assert!(add_entry.get("binary").is_none());
    }
}

#[tokio::test]
async fn upload_errors_follow_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| b.max_body_bytes(1024 * 1024)).await;

    let junk = upload(&agent, form(b"not wasm at all".to_vec(), "Junk", "junk")).await;
    TestAgent::expect_error(junk, 400, "module_invalid").await;

    let no_main = upload(&agent, form(fixture("echo"), "Echo", "echo")).await;
    let message = TestAgent::expect_error(no_main, 400, "module_missing_main").await;
    assert!(message.contains("_main"), "{message}");

    let first = upload(&agent, form(fixture("add_ten"), "Add", "calc.add")).await;
    assert_eq!(first.status().as_u16(), 201);
    let hash = first.text().await.unwrap();
    let again = upload(&agent, form(fixture("add_ten"), "Add", "calc.add")).await;
    assert_eq!(
        again.status().as_u16(),
        201,
        "identical re-upload is idempotent"
    );
    assert_eq!(again.text().await.unwrap(), hash);

    let taken = upload(
        &agent,
        form(fixture("multiply_by_five"), "Times", "calc.add"),
    )
    .await;
    TestAgent::expect_error(taken, 409, "module_conflict").await;

    let missing = Form::new()
        .part("binary", Part::bytes(fixture("add_ten")))
        .text("title", "x");
    let message =
        TestAgent::expect_error(upload(&agent, missing).await, 400, "missing_field").await;
    assert!(message.contains("subject"), "{message}");

    let not_multipart = agent
        .http
        .post(agent.url("/api/v1/modules"))
        .body(fixture("add_ten"))
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(not_multipart, 400, "not_multipart").await;

    let huge = upload(&agent, form(vec![0; 2 * 1024 * 1024], "Huge", "huge")).await;
    TestAgent::expect_error(huge, 413, "payload_too_large").await;

    // Nothing from the failed uploads was stored.
    let list: serde_json::Value = agent
        .http
        .get(agent.url("/api/v1/modules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn execute_errors_follow_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let add = upload(&agent, form(fixture("add_ten"), "Add", "calc.add"))
        .await
        .text()
        .await
        .unwrap();

    TestAgent::expect_error(
        execute(&agent, &"0".repeat(64), "5").await,
        404,
        "module_not_found",
    )
    .await;
    TestAgent::expect_error(
        execute(&agent, "not-a-hash", "5").await,
        404,
        "module_not_found",
    )
    .await;
    TestAgent::expect_error(execute(&agent, &add, "").await, 400, "invalid_json").await;
    TestAgent::expect_error(
        execute(&agent, &add, "{not json").await,
        400,
        "invalid_json",
    )
    .await;

    // A guest error is a 422 with the guest's message, and the agent keeps serving.
    let message =
        TestAgent::expect_error(execute(&agent, &add, "\"text\"").await, 422, "guest_error").await;
    assert!(message.contains("number"), "{message}");
    assert_eq!(execute(&agent, &add, "1").await.text().await.unwrap(), "11");

    let wrong_method = agent
        .http
        .get(agent.url(&format!("/api/v1/modules/{add}/execute")))
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(wrong_method, 405, "method_not_allowed").await;
    let wrong_method = agent
        .http
        .delete(agent.url("/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status().as_u16(), 405);
}

/// Regression for the original's freeze: two endless loops must not stop the server.
#[tokio::test]
async fn looping_modules_are_stopped_and_others_keep_running() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| b.workers(3)).await;
    let looper = wat::parse_str(
        r#"(module (func (export "_main") (result i32) (loop $l (br $l)) (i32.const 0)))"#,
    )
    .unwrap();
    let loop_hash = upload(&agent, form(looper, "Loop", "loop"))
        .await
        .text()
        .await
        .unwrap();
    let add = upload(&agent, form(fixture("add_ten"), "Add", "calc.add"))
        .await
        .text()
        .await
        .unwrap();
    let (first, second, ok) = tokio::join!(
        execute(&agent, &loop_hash, "1"),
        execute(&agent, &loop_hash, "2"),
        execute(&agent, &add, "3")
    );
    TestAgent::expect_error(first, 422, "timeout").await;
    TestAgent::expect_error(second, 422, "timeout").await;
    assert_eq!(ok.text().await.unwrap(), "13");
}

/// Upload with a bearer token.
async fn upload_as(agent: &TestAgent, token: &str, form: Form) -> reqwest::Response {
    agent
        .http
        .post(agent.url("/api/v1/modules"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

async fn list_as(agent: &TestAgent, token: Option<&str>) -> reqwest::Response {
    let request = agent.http.get(agent.url("/api/v1/modules"));
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    request.send().await.unwrap()
}

/// Issue 11 (critical): an operator's `adder@1.0` could be replaced by anyone who
/// reached the port: a v1 upload under subject `adder` wrote into the default tenant,
/// and the bare name then resolved to the newest upload.
#[tokio::test]
async fn a_module_cannot_be_taken_over_through_the_v1_routes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let operators = |tenant: &str| {
        agent
            .agent
            .engine()
            .add_module(
                tenant,
                NewModule {
                    name: "adder".into(),
                    version: Some("1.0".into()),
                    bytes: fixture("add_ten"),
                    ..NewModule::default()
                },
            )
            .unwrap()
            .id
    };
    let in_default = operators(DEFAULT_TENANT);
    let in_v1 = operators(V1_TENANT);
    let attack = upload(&agent, form(fixture("multiply_by_five"), "Mine", "adder")).await;
    TestAgent::expect_error(attack, 409, "module_conflict").await;
    for (tenant, id) in [(DEFAULT_TENANT, in_default), (V1_TENANT, in_v1)] {
        let resolved = agent.agent.engine().registry().resolve(tenant, "adder");
        assert_eq!(resolved.unwrap().id, id, "{tenant}");
    }
    agent.stop().await;
}

/// Issue 11: with `--v1-require-token`, any tenant's token could list, execute and
/// upload on the v1 modules.
#[tokio::test]
async fn other_tenants_tokens_cannot_use_the_v1_routes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| b.v1_access(V1Access::Token)).await;
    let acme = agent.tenant_token("acme").await;
    TestAgent::expect_error(list_as(&agent, Some(&acme)).await, 403, "forbidden").await;
    let upload = upload_as(&agent, &acme, form(fixture("add_ten"), "Add", "calc.add")).await;
    TestAgent::expect_error(upload, 403, "forbidden").await;
    TestAgent::expect_error(list_as(&agent, None).await, 401, "unauthorized").await;
    // The v1 tenant's token and the admin's work.
    let v1 = agent.tenant_token(V1_TENANT).await;
    let uploaded = upload_as(&agent, &v1, form(fixture("add_ten"), "Add", "calc.add")).await;
    assert_eq!(uploaded.status().as_u16(), 201);
    assert_eq!(list_as(&agent, Some(ADMIN)).await.status().as_u16(), 200);
    agent.stop().await;
}

/// Issue 11: the v1 routes were open without a token wherever the agent listened.
#[tokio::test]
async fn beyond_loopback_the_v1_routes_need_a_token_unless_opened() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_on(dir.path(), "0.0.0.0:0", |b| b).await;
    TestAgent::expect_error(list_as(&agent, None).await, 401, "unauthorized").await;
    let upload = upload(&agent, form(fixture("add_ten"), "Add", "calc.add")).await;
    TestAgent::expect_error(upload, 401, "unauthorized").await;
    assert_eq!(list_as(&agent, Some(ADMIN)).await.status().as_u16(), 200);
    agent.stop().await;

    let opened =
        TestAgent::start_on(dir.path(), "0.0.0.0:0", |b| b.v1_access(V1Access::Open)).await;
    assert_eq!(list_as(&opened, None).await.status().as_u16(), 200);
    opened.stop().await;
}
