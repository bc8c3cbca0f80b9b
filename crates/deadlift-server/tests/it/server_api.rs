//! The `/v1` API over real HTTP: modules, calls, tenants, tokens, KV, auth and tenant
//! isolation, health and metrics, and a restart on the same data directory.

use serde_json::{Value, json};

use crate::common::fixture;
use crate::common::server::{ADMIN, TestAgent};

struct Api<'a> {
    agent: &'a TestAgent,
    token: String,
}

impl Api<'_> {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.agent
            .http
            .request(method, self.agent.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends a request with no body.
    async fn send(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        self.request(method, path).send().await.unwrap()
    }

    /// Sends a request with no body and reads a JSON answer.
    async fn json(&self, method: reqwest::Method, path: &str) -> Value {
        self.send(method, path).await.json().await.unwrap()
    }

    async fn push(&self, name: &str, fixture_name: &str) -> Value {
        let response = self
            .request(reqwest::Method::POST, "/v1/modules")
            .query(&[("name", name)])
            .body(fixture(fixture_name))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201);
        response.json().await.unwrap()
    }

    async fn call(&self, module: &str, function: &str, input: &str) -> reqwest::Response {
        self.request(
            reqwest::Method::POST,
            &format!("/v1/modules/{module}/call/{function}"),
        )
        .body(input.to_owned())
        .send()
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn modules_upload_list_show_call_delete() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let api = Api {
        token: agent.tenant_token("acme").await,
        agent: &agent,
    };
    let info = api.push("adder", "add_ten").await;
    assert!(info["id"].as_str().unwrap().starts_with("sha256:"));
    assert!(
        info["exports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "_main")
    );

    let list: Value = api.json(reqwest::Method::GET, "/v1/modules").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let shown: Value = api.json(reqwest::Method::GET, "/v1/modules/adder").await;
    assert_eq!(shown["id"], info["id"]);

    let out: Value = api.call("adder", "_main", "32").await.json().await.unwrap();
    assert_eq!(out["output"], 42);
    assert!(out["duration_us"].is_u64() && out["fuel_used"].is_u64());
    let raw = api
        .request(
            reqwest::Method::POST,
            "/v1/modules/adder/call/_main?format=raw",
        )
        .body("1")
        .send()
        .await
        .unwrap();
    assert!(raw.headers().contains_key("x-deadlift-fuel-used"));
    assert_eq!(raw.text().await.unwrap(), "11");

    TestAgent::expect_error(
        api.call("adder", "nope", "1").await,
        404,
        "function_not_found",
    )
    .await;
    TestAgent::expect_error(
        api.call("missing", "_main", "1").await,
        404,
        "module_not_found",
    )
    .await;

    let bad = api
        .request(reqwest::Method::POST, "/v1/modules")
        .query(&[("name", "junk")])
        .body("garbage")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(bad, 400, "module_invalid").await;
    let unnamed = api
        .request(reqwest::Method::POST, "/v1/modules")
        .body(fixture("echo"))
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(unnamed, 400, "missing_field").await;

    let deleted = api.send(reqwest::Method::DELETE, "/v1/modules/adder").await;
    assert_eq!(deleted.status().as_u16(), 204);
    TestAgent::expect_error(
        api.call("adder", "_main", "1").await,
        404,
        "module_not_found",
    )
    .await;
}

#[tokio::test]
async fn tokens_are_required_and_scoped() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let none = agent
        .http
        .get(agent.url("/v1/modules"))
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(none, 401, "unauthorized").await;
    let wrong = agent
        .http
        .get(agent.url("/v1/modules"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(wrong, 401, "unauthorized").await;
    let malformed = agent
        .http
        .get(agent.url("/v1/modules"))
        .header("authorization", "Basic x")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(malformed, 401, "unauthorized").await;

    let token = agent.tenant_token("acme").await;
    let tenant = Api {
        agent: &agent,
        token,
    };
    let admin_only = tenant.send(reqwest::Method::GET, "/v1/tenants").await;
    TestAgent::expect_error(admin_only, 403, "forbidden").await;
    let admin_only = tenant
        .send(reqwest::Method::POST, "/v1/tenants/acme/tokens")
        .await;
    TestAgent::expect_error(admin_only, 403, "forbidden").await;

    let admin = Api {
        agent: &agent,
        token: ADMIN.into(),
    };
    // The admin acts on an existing tenant's data when it names the tenant.
    let as_acme = admin
        .request(reqwest::Method::GET, "/v1/modules")
        .header("x-deadlift-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(as_acme.status().as_u16(), 200);
    let as_ghost = admin
        .request(reqwest::Method::PUT, "/v1/kv/k")
        .header("x-deadlift-tenant", "ghost")
        .body("v")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(as_ghost, 404, "tenant_not_found").await;
    let no_tenant = admin.send(reqwest::Method::GET, "/v1/modules").await;
    TestAgent::expect_error(no_tenant, 403, "forbidden").await;
    let dup = admin
        .request(reqwest::Method::POST, "/v1/tenants")
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(dup, 409, "tenant_exists").await;
    let invalid = admin
        .request(reqwest::Method::POST, "/v1/tenants")
        .json(&json!({"name": "Bad Name"}))
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(invalid, 400, "tenant_invalid").await;
    let not_json = admin
        .request(reqwest::Method::POST, "/v1/tenants")
        .body("{")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(not_json, 400, "invalid_json").await;
    let unknown = admin
        .send(reqwest::Method::POST, "/v1/tenants/ghost/tokens")
        .await;
    TestAgent::expect_error(unknown, 404, "tenant_not_found").await;

    // A revoked token stops working.
    let tokens: Value = admin.json(reqwest::Method::GET, "/v1/tokens").await;
    let id = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "acme")
        .unwrap()["id"]
        .clone();
    let revoked = admin
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/tokens/{}", id.as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 204);
    let after = tenant.send(reqwest::Method::GET, "/v1/modules").await;
    TestAgent::expect_error(after, 401, "unauthorized").await;
}

#[tokio::test]
async fn tenants_cannot_see_call_change_or_delete_each_others_things() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let a = Api {
        token: agent.tenant_token("a").await,
        agent: &agent,
    };
    let b = Api {
        token: agent.tenant_token("b").await,
        agent: &agent,
    };
    let info = a.push("adder", "add_ten").await;
    let id = info["id"].as_str().unwrap();

    let listed: Value = b.json(reqwest::Method::GET, "/v1/modules").await;
    assert_eq!(listed, json!([]));
    for path in ["/v1/modules/adder".to_owned(), format!("/v1/modules/{id}")] {
        let shown = b.send(reqwest::Method::GET, &path).await;
        TestAgent::expect_error(shown, 404, "module_not_found").await;
        let deleted = b.send(reqwest::Method::DELETE, &path).await;
        TestAgent::expect_error(deleted, 404, "module_not_found").await;
    }
    TestAgent::expect_error(b.call(id, "_main", "1").await, 404, "module_not_found").await;
    assert_eq!(a.call("adder", "_main", "1").await.status().as_u16(), 200);

    let put = a
        .request(reqwest::Method::PUT, "/v1/kv/secret")
        .body("a's")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 204);
    let read = b.send(reqwest::Method::GET, "/v1/kv/secret").await;
    TestAgent::expect_error(read, 404, "key_not_found").await;
    let delete = b.send(reqwest::Method::DELETE, "/v1/kv/secret").await;
    TestAgent::expect_error(delete, 404, "key_not_found").await;
    let keys: Value = b.json(reqwest::Method::GET, "/v1/kv").await;
    assert_eq!(keys["keys"], json!([]));
    let own = a.send(reqwest::Method::GET, "/v1/kv/secret").await;
    assert_eq!(own.text().await.unwrap(), "a's");
}

#[tokio::test]
async fn kv_written_by_a_module_is_visible_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let grant = deadlift_engine::Grant::default().allow(["kv_get", "kv_set", "kv_delete"]);
    let agent = TestAgent::start_with(dir.path(), |b| b.default_grant(grant)).await;
    let api = Api {
        token: agent.tenant_token("acme").await,
        agent: &agent,
    };
    api.push("counter", "kv_counter").await;
    for expected in [1, 2, 3] {
        let out: Value = api
            .call("counter", "increment", "visits")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(out["output"], expected);
    }
    let value = api
        .send(reqwest::Method::GET, "/v1/kv/visits")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(value, "3");
    let keys: Value = api.json(reqwest::Method::GET, "/v1/kv?prefix=vis").await;
    assert_eq!(keys["keys"], json!(["visits"]));
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            agent
                .http
                .get(agent.url(path))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            204
        );
    }
    let api = Api {
        token: agent.tenant_token("acme").await,
        agent: &agent,
    };
    api.push("adder", "add_ten").await;
    api.call("adder", "_main", "1").await;
    api.call("adder", "_main", "\"x\"").await;
    let text = agent.metrics().await;
    assert!(text.contains("deadlift_calls_total 2"), "{text}");
    assert!(
        text.contains("deadlift_call_errors_by_code_total{code=\"guest_error\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("deadlift_call_duration_seconds_count 2"),
        "{text}"
    );
    assert!(text.contains("deadlift_idle_instances"), "{text}");
    let missing = agent.http.get(agent.url("/nowhere")).send().await.unwrap();
    TestAgent::expect_error(missing, 404, "route_not_found").await;
}

/// Modules, tokens and KV survive a restart, and the restart does not recompile.
#[tokio::test]
async fn a_restart_keeps_state_and_does_not_recompile() {
    let dir = tempfile::tempdir().unwrap();
    let grant = deadlift_engine::Grant::default().allow(["kv_get", "kv_set", "kv_delete"]);
    let agent = TestAgent::start_with(dir.path(), |b| b.default_grant(grant.clone())).await;
    let token = agent.tenant_token("acme").await;
    {
        let api = Api {
            token: token.clone(),
            agent: &agent,
        };
        api.push("counter", "kv_counter").await;
        api.call("counter", "increment", "visits").await;
    }
    assert_eq!(agent.agent.engine().stats().compiled, 1);
    agent.stop().await;

    let agent = TestAgent::start_with(dir.path(), |b| b.default_grant(grant)).await;
    let api = Api {
        token,
        agent: &agent,
    };
    let out: Value = api
        .call("counter", "increment", "visits")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(out["output"], 2, "KV and module survived");
    let stats = agent.agent.engine().stats();
    assert_eq!(
        (stats.compiled, stats.loaded_from_cache),
        (0, 1),
        "{stats:?}"
    );
}

#[tokio::test]
async fn the_openapi_document_describes_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let doc: Value = agent
        .http
        .get(agent.url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/modules",
        "/v1/modules/{reference}/call/{function}",
        "/v1/tenants",
        "/v1/kv/{key}",
    ] {
        assert!(paths.contains_key(path), "missing {path}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["ModuleInfo"].is_object());
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/status",
        "/api/v1/modules",
        "/api/v1/modules/{hash}/execute",
        "/api/v1/workflows",
        "/api/v1/workflows/{id}/execute",
    ] {
        assert!(paths.contains_key(path), "missing {path}");
    }
    // Issue 14: 401 and 403 were undocumented on secured operations.
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            if operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
            {
                for status in ["401", "403"] {
                    assert!(
                        operation["responses"][status].is_object(),
                        "{method} {path} does not document {status}"
                    );
                }
            }
        }
    }

    // Issue 14: `openapi-spec-validator` found 21 errors (path parameters undeclared, the
    // run filters declared as path parameters). It is installed by the project's script.
    let bin = python_tools();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let checked = std::process::Command::new(format!("{bin}/openapi-spec-validator"))
        .args(["--validation-errors", "all"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    agent.stop().await;
}

/// The bin directory of the project's Python tools (installed by its own script).
fn python_tools() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let tools = std::process::Command::new(format!("{root}/scripts/python-tools"))
        .output()
        .expect("scripts/python-tools runs");
    assert!(
        tools.status.success(),
        "{}",
        String::from_utf8_lossy(&tools.stderr)
    );
    String::from_utf8(tools.stdout).unwrap().trim().to_owned()
}

/// Issue 14: schemathesis found 32 to 39 failures per run. It now runs against a live
/// agent with a bounded number of examples, as a tenant and as the admin acting for one,
/// with every check (responses validated against the document included); the only
/// allowances are the documented ones in `tests/schemathesis.toml`.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let tenant = agent.tenant_token("acme").await;
    let bin = python_tools();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let schema = agent.url("/v1/openapi.json");
    for headers in [
        vec![format!("Authorization: Bearer {tenant}")],
        vec![
            format!("Authorization: Bearer {ADMIN}"),
            "X-Deadlift-Tenant: acme".to_owned(),
        ],
    ] {
        let run = || {
            let mut command = tokio::process::Command::new(format!("{bin}/schemathesis"));
            // It keeps a cache where it runs: in the test's directory, not the repository.
            command
                .current_dir(dir.path())
                .args(["--no-color", "--config-file", config, "run", &schema])
                // One worker: with two threads, Python 3.11's parser can fail inside the
                // tool ("AST constructor recursion depth mismatch": its recursion counter
                // is not thread-safe there).
                .args(["--max-examples", "8", "--seed", "14", "--workers", "1"]);
            for header in &headers {
                command.args(["--header", header]);
            }
            command.output()
        };
        let mut out = run().await.unwrap();
        // The tool itself can crash in its own Python internals; that is no finding about
        // the API, so a run that reports only such an error, and no failure, is run once
        // more.
        let crashed = |out: &std::process::Output| {
            let report = String::from_utf8_lossy(&out.stdout);
            !out.status.success()
                && report.contains("Runtime Error")
                && !report.contains("Failures:")
        };
        if crashed(&out) {
            out = run().await.unwrap();
        }
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis as {}:\n{report}{}",
            headers.len(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    agent.stop().await;
}

/// Concurrent identical uploads all succeed with the same module: the loser of the race
/// at the database gets the winner's record, not a storage error.
#[tokio::test]
async fn concurrent_identical_uploads_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let api = Api {
        token: agent.tenant_token("acme").await,
        agent: &agent,
    };
    let uploads = (0..8).map(|_| api.push("adder", "add_ten"));
    let mut ids = std::collections::BTreeSet::new();
    for info in futures_join(uploads).await {
        ids.insert(info["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1);
}

/// Polls futures concurrently on the current task.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (future, slot) in pending.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *slot = Some(value),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    done.into_iter().map(|v| v.unwrap()).collect()
}

/// Issue 11: `--admin-token x` was accepted.
#[tokio::test]
async fn an_admin_token_below_128_bits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for weak in ["x", "test-admin-token", &"ab".repeat(40)] {
        let builder = deadlift_agent::Agent::builder(dir.path()).admin_token(Some(weak.into()));
        let built = tokio::task::spawn_blocking(move || builder.build())
            .await
            .unwrap();
        assert!(
            matches!(built, Err(deadlift_agent::AgentError::WeakToken { .. })),
            "{weak}: {built:?}"
        );
    }
}

/// Issue 11: restarting with a new `--admin-token` left the old one valid.
#[tokio::test]
async fn a_new_admin_token_revokes_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestAgent::start(dir.path()).await;
    first.stop().await;
    const NEW: &str = "another-admin-token-Hk8sN2vQ7wE4rT9yU1iO";
    let agent = TestAgent::start_with(dir.path(), |b| b.admin_token(Some(NEW.to_owned()))).await;
    let tenants = |token: &'static str| {
        agent
            .http
            .get(agent.url("/v1/tenants"))
            .bearer_auth(token)
            .send()
    };
    TestAgent::expect_error(tenants(ADMIN).await.unwrap(), 401, "unauthorized").await;
    assert_eq!(tenants(NEW).await.unwrap().status().as_u16(), 200);
    agent.stop().await;
}

/// Issue 11: the data directory was 0755 and `agent.db` 0644.
#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("data");
    let agent = TestAgent::start(&data).await;
    // A write, so that SQLite has made its -wal file too.
    let created = agent
        .http
        .post(agent.url("/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for file in ["agent.db", "agent.db-wal", "identity.key"] {
        let path = data.join(file);
        assert!(path.exists(), "{file}");
        assert_eq!(mode(&path), 0o600, "{file}");
    }
    agent.stop().await;
}

/// Issue 11: direct calls ran with one agent-wide grant, so plug-ins that need config,
/// hosts or host functions could not be called over HTTP. A module's manifest now gives
/// its calls their options, held to the operator's policy.
#[tokio::test]
async fn a_modules_manifest_gives_its_direct_calls_their_options() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let acme = Api {
        agent: &agent,
        token: agent.tenant_token("acme").await,
    };
    acme.push("greeter", "vars_config").await;
    let greet = || async {
        acme.request(reqwest::Method::POST, "/v1/modules/greeter/call/greet")
            .body("Ada")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert_eq!(greet().await["output_text"], "Hello, Ada!");
    let stored = acme
        .request(reqwest::Method::PUT, "/v1/modules/greeter/manifest")
        .json(&json!({"config": {"greeting": "Hi"}, "memory": {"max_pages": 64}}))
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status().as_u16(), 200);
    assert_eq!(greet().await["output_text"], "Hi, Ada!");
    let shown = acme
        .json(reqwest::Method::GET, "/v1/modules/greeter/manifest")
        .await;
    assert_eq!(shown["config"]["greeting"], "Hi");

    // Over the operator's policy: refused, field by field.
    let greedy = acme
        .request(reqwest::Method::PUT, "/v1/modules/greeter/manifest")
        .json(&json!({"allowed_hosts": ["169.254.169.254"], "host_functions": ["send_email"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(greedy.status().as_u16(), 403);
    let body: Value = greedy.json().await.unwrap();
    assert_eq!(body["error"]["code"], "grant_over_policy");
    let fields: Vec<&str> = body["error"]["details"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["host_functions", "allowed_hosts"], "{body}");

    // A module that needs KV host functions runs with them once its manifest says so.
    acme.push("counter", "kv_counter").await;
    let denied = acme
        .request(reqwest::Method::POST, "/v1/modules/counter/call/increment")
        .body("visits")
        .send()
        .await
        .unwrap();
    TestAgent::expect_error(denied, 422, "host_function_denied").await;
    let granted = acme
        .request(reqwest::Method::PUT, "/v1/modules/counter/manifest")
        .json(&json!({"host_functions": ["kv_get", "kv_set", "kv_delete"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status().as_u16(), 200);
    let counted = acme
        .request(reqwest::Method::POST, "/v1/modules/counter/call/increment")
        .body("visits")
        .send()
        .await
        .unwrap();
    assert_eq!(counted.status().as_u16(), 200);

    // A call may narrow its grant, never widen it.
    acme.push("looper", "looper").await;
    let narrowed = acme
        .request(
            reqwest::Method::POST,
            "/v1/modules/looper/call/loop_forever?timeout_ms=50",
        )
        .send()
        .await
        .unwrap();
    let message = TestAgent::expect_error(narrowed, 422, "timeout").await;
    assert!(message.contains("50 ms"), "{message}");
    let widened = acme
        .request(
            reqwest::Method::POST,
            "/v1/modules/looper/call/loop_forever?timeout_ms=600000",
        )
        .send()
        .await
        .unwrap();
    // The default grant's limit (300 ms in these tests) still holds.
    let message = TestAgent::expect_error(widened, 422, "timeout").await;
    assert!(message.contains("300 ms"), "{message}");
    agent.stop().await;
}

/// Issue 11: plug-ins that need config, WASI, memory limits, time limits or fuel run over
/// HTTP with a stored manifest and give what the `extism` SDK gives with the same
/// manifest document.
#[tokio::test]
async fn manifest_options_over_http_give_the_sdks_results() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    let acme = Api {
        agent: &agent,
        token: agent.tenant_token("acme").await,
    };
    let cases: &[(&str, Value, &str, &str)] = &[
        (
            "vars_config",
            json!({"config": {"greeting": "Hi"}}),
            "greet",
            "Ada",
        ),
        (
            "count_vowels",
            json!({"config": {"vowels": "xyz"}}),
            "count_vowels",
            "xylophone yz",
        ),
        (
            "allocator",
            json!({"memory": {"max_pages": 64}}),
            "alloc_mib",
            "2",
        ),
        (
            "allocator",
            json!({"memory": {"max_pages": 17}}),
            "alloc_mib",
            "2",
        ),
        ("looper", json!({"timeout_ms": 100}), "loop_forever", ""),
        ("looper", json!({"fuel": 200000}), "spin", "100000000"),
        ("looper", json!({"fuel": 200000}), "spin", "10"),
        ("zig_guest", json!({"wasi": true}), "greet", "Ada"),
    ];
    let mut pushed = std::collections::HashSet::new();
    for (fixture_name, manifest, function, input) in cases {
        // One module per fixture; each case replaces its manifest.
        let name = fixture_name.replace('_', "-");
        if pushed.insert(name.clone()) {
            acme.push(&name, fixture_name).await;
        }
        let stored = acme
            .request(
                reqwest::Method::PUT,
                &format!("/v1/modules/{name}/manifest"),
            )
            .json(manifest)
            .send()
            .await
            .unwrap();
        assert_eq!(stored.status().as_u16(), 200, "{fixture_name} {manifest}");
        let response = acme
            .request(
                reqwest::Method::POST,
                &format!("/v1/modules/{name}/call/{function}?format=raw"),
            )
            .body(input.to_string())
            .send()
            .await
            .unwrap();
        let ours = match response.status().as_u16() {
            200 => Ok(response.bytes().await.unwrap().to_vec()),
            status => Err(format!("{status}: {}", response.text().await.unwrap())),
        };
        let sdk = sdk_call(fixture_name, manifest, function, input.as_bytes());
        match (&ours, &sdk) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{fixture_name} {manifest}"),
            (Err(ours), Err(_)) => assert!(ours.starts_with("422"), "{ours}"),
            _ => panic!("{fixture_name} {manifest}: ours {ours:?}, the SDK's {sdk:?}"),
        }
    }
    agent.stop().await;
}

/// One call through the SDK, with `manifest` (our JSON, which is the SDK's manifest
/// plus `wasi` and `fuel`, which the SDK takes from its builder).
fn sdk_call(
    fixture_name: &str,
    manifest: &Value,
    function: &str,
    input: &[u8],
) -> Result<Vec<u8>, String> {
    let mut document = manifest.clone();
    let options = document.as_object_mut().unwrap();
    let wasi = options.remove("wasi").is_some_and(|v| v == true);
    let fuel = options.remove("fuel").and_then(|v| v.as_u64());
    options.insert("wasm".into(), json!([]));
    let mut sdk_manifest: extism::Manifest = serde_json::from_value(document).unwrap();
    sdk_manifest.wasm = vec![extism::Wasm::data(fixture(fixture_name))];
    let mut builder = extism::PluginBuilder::new(sdk_manifest)
        .with_wasi(wasi)
        .with_cache_disabled();
    if let Some(fuel) = fuel {
        builder = builder.with_fuel_limit(fuel);
    }
    let mut plugin = builder.build().map_err(|e| e.to_string())?;
    plugin
        .call::<&[u8], Vec<u8>>(function, input)
        .map_err(|e| e.to_string())
}

/// Issue 12: one tenant's flood delayed everyone (one FIFO queue, nothing shed). A
/// tenant over its queue is answered 429 with `Retry-After`, counted in the metrics,
/// while another tenant's call goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_is_answered_429_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| {
        b.engine(|e| e.tenant_in_flight(1).tenant_queue(1))
    })
    .await;
    let acme = Api {
        agent: &agent,
        token: agent.tenant_token("acme").await,
    };
    let other = Api {
        agent: &agent,
        token: agent.tenant_token("other").await,
    };
    acme.push("looper", "looper").await;
    other.push("adder", "add_ten").await;
    let flood: Vec<_> = (0..4)
        .map(|_| acme.call("looper", "loop_forever", ""))
        .collect();
    let (flood, served) = tokio::join!(
        futures_util::future::join_all(flood),
        other.call("adder", "_main", "1")
    );
    assert_eq!(served.status().as_u16(), 200);
    let mut statuses = Vec::new();
    for response in flood {
        let status = response.status().as_u16();
        if status == 429 {
            let retry_after = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(retry_after.parse::<u64>().unwrap() >= 1, "{retry_after}");
            TestAgent::expect_error(response, 429, "tenant_overloaded").await;
        }
        statuses.push(status);
    }
    statuses.sort();
    // One runs (and times out), one waits and runs, two are shed.
    assert_eq!(statuses, [422, 422, 429, 429]);
    let metrics = agent.metrics().await;
    assert!(metrics.contains("deadlift_calls_shed_total 2"), "{metrics}");
    agent.stop().await;
}

/// Issue 12: a 15 MB module was accepted without a token or a limit and compiled for
/// 25 s. Modules over the cap are answered 413 before any compiling.
#[tokio::test]
async fn a_module_over_the_size_cap_is_answered_413() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| b.engine(|e| e.max_module_bytes(4096))).await;
    let acme = Api {
        agent: &agent,
        token: agent.tenant_token("acme").await,
    };
    let response = acme
        .request(reqwest::Method::POST, "/v1/modules")
        .query(&[("name", "big")])
        .body(fixture("count_vowels"))
        .send()
        .await
        .unwrap();
    let message = TestAgent::expect_error(response, 413, "module_too_large").await;
    assert!(message.contains("4096"), "{message}");
    assert_eq!(agent.agent.engine().stats().compiled, 0);
    agent.stop().await;
}

/// Issue 14: a bad integer in a path answered `text/plain`, not the JSON error shape.
#[tokio::test]
async fn bad_path_and_query_values_answer_the_json_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(dir.path()).await;
    for (method, path) in [
        (reqwest::Method::POST, "/v1/outbox/abc/replay"),
        (reqwest::Method::POST, "/v1/dead-letters/1e9x/replay"),
        (reqwest::Method::GET, "/v1/runs?limit=many"),
        (reqwest::Method::GET, "/v1/runs?status=sideways"),
        (reqwest::Method::GET, "/v1/runs?limit=0"),
        (reqwest::Method::GET, "/v1/runs?limit=2147483648"),
        (reqwest::Method::GET, "/v1/dead-letters?limit=501"),
        (reqwest::Method::GET, "/v1/outbox?limit=100000"),
    ] {
        let response = agent
            .http
            .request(method, agent.url(path))
            .bearer_auth(ADMIN)
            .header("x-deadlift-tenant", "default")
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
        TestAgent::expect_error(response, 400, "bad_request").await;
    }
    agent.stop().await;
}
