//! OpenTelemetry export against a receiver that decodes real OTLP/HTTP protobuf (the
//! protocol's own generated messages): a run, its step and its plug-in call, and direct
//! calls, each with the attributes and parents a trace backend needs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;

use crate::common::fixture;
use crate::common::server::{ADMIN, TestAgent};

/// What the receiver got: each request's resource attributes and spans.
type Received = Arc<Mutex<Vec<(Vec<(String, String)>, Vec<Span>)>>>;

async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                for spans in request.resource_spans {
                    let resource = spans
                        .resource
                        .map(|r| {
                            r.attributes
                                .into_iter()
                                .map(|kv| (kv.key, text(kv.value.and_then(|v| v.value))))
                                .collect()
                        })
                        .unwrap_or_default();
                    let all = spans
                        .scope_spans
                        .into_iter()
                        .flat_map(|s| s.spans)
                        .collect();
                    sink.lock().unwrap().push((resource, all));
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn text(value: Option<Any>) -> String {
    match value {
        Some(Any::StringValue(s)) => s,
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(kv.value.clone().and_then(|v| v.value)))
}

fn spans(received: &Received) -> Vec<Span> {
    received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|(_, spans)| spans.clone())
        .collect()
}

const STATUS_OK: i32 = 1;
const STATUS_ERROR: i32 = 2;

/// Issue 14: runs, steps and plug-in calls exported as spans over OTLP/HTTP with tenant,
/// module hash, function, fuel and status.
#[tokio::test]
async fn runs_steps_and_calls_reach_an_otlp_receiver_as_spans() {
    let (collector, received) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(dir.path(), |b| b.otlp_endpoint(Some(collector))).await;
    let request = |method: reqwest::Method, path: &str| {
        agent
            .http
            .request(method, agent.url(path))
            .bearer_auth(ADMIN)
            .header("x-deadlift-tenant", "default")
    };
    let pushed: Value = request(reqwest::Method::POST, "/v1/modules?name=add-ten&version=1")
        .body(fixture("add_ten"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let module = pushed["id"].as_str().unwrap().to_owned();
    let applied = request(reqwest::Method::PUT, "/v1/workflows/calc")
        .header("content-type", "application/toml")
        .body("[[steps]]\nid = \"add\"\ncall = \"add-ten\"\ngrant = { fuel = 10_000_000 }\n")
        .send()
        .await
        .unwrap();
    assert!(applied.status().is_success());
    let run: Value = request(reqwest::Method::POST, "/v1/workflows/calc/runs?wait=true")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body("5")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    // Direct calls: one in the caller's trace, one that fails.
    let called = request(reqwest::Method::POST, "/v1/modules/add-ten/call/_main")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body("5")
        .send()
        .await
        .unwrap();
    assert!(called.status().is_success());
    let failed = request(reqwest::Method::POST, "/v1/modules/add-ten/call/_main")
        .body("\"x\"")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status().as_u16(), 422);

    let mut all = Vec::new();
    for _ in 0..100 {
        all = spans(&received);
        if all.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let named = |name: &str| -> Vec<&Span> { all.iter().filter(|s| s.name == name).collect() };
    let run_span = *named("run calc").first().expect("a run span");
    let step_span = *named("step add").first().expect("a step span");
    let calls = named("call _main");
    assert_eq!(calls.len(), 3, "one call in the run, two direct: {all:#?}");

    // The run: in the caller's trace, with its tenant, workflow and outcome.
    assert_eq!(hex(&run_span.trace_id), "0af7651916cd43dd8448eb211c80319c");
    let traceparent = run["traceparent"].as_str().unwrap();
    assert_eq!(hex(&run_span.span_id), traceparent[36..52]);
    assert_eq!(
        attribute(run_span, "deadlift.tenant").as_deref(),
        Some("default")
    );
    assert_eq!(
        attribute(run_span, "deadlift.run.id"),
        run["id"].as_str().map(str::to_owned)
    );
    assert_eq!(run_span.status.as_ref().unwrap().code, STATUS_OK);
    assert!(run_span.end_time_unix_nano >= run_span.start_time_unix_nano);
    // The step under the run, the plug-in call under the step.
    assert_eq!(step_span.parent_span_id, run_span.span_id);
    assert_eq!(step_span.trace_id, run_span.trace_id);
    let in_run = calls
        .iter()
        .find(|c| c.parent_span_id == step_span.span_id)
        .expect("the step's call");
    assert_eq!(
        attribute(in_run, "deadlift.module.id"),
        Some(module.clone())
    );
    assert_eq!(
        attribute(in_run, "deadlift.function").as_deref(),
        Some("_main")
    );
    // The version of the name that served it.
    assert_eq!(
        attribute(in_run, "deadlift.module.version").as_deref(),
        Some("1")
    );
    let fuel: u64 = attribute(in_run, "deadlift.fuel_used")
        .unwrap()
        .parse()
        .unwrap();
    assert!(fuel > 0);
    // Direct calls: the caller's trace and parent; a failure is an error span with its code.
    let direct = calls
        .iter()
        .find(|c| hex(&c.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736")
        .expect("the direct call in the caller's trace");
    assert_eq!(hex(&direct.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(direct.status.as_ref().unwrap().code, STATUS_OK);
    let failing = calls
        .iter()
        .find(|c| c.status.as_ref().is_some_and(|s| s.code == STATUS_ERROR))
        .expect("the failed call");
    assert_eq!(
        attribute(failing, "deadlift.error.code").as_deref(),
        Some("guest_error")
    );
    assert_eq!(
        attribute(failing, "deadlift.tenant").as_deref(),
        Some("default")
    );
    // The exporter's own counts are in /metrics (once the collector's answer is in).
    let exported = |metrics: &str| {
        metrics
            .lines()
            .any(|l| l.starts_with("deadlift_spans_exported_total ") && !l.ends_with(" 0"))
    };
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = agent.metrics().await;
        if exported(&metrics) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exported(&metrics), "{metrics}");
    // The resource names the service and the agent.
    let resource = received.lock().unwrap()[0].0.clone();
    assert!(
        resource.contains(&("service.name".into(), "deadlift".into())),
        "{resource:?}"
    );
    agent.stop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
