//! Outbound HTTP (`http_request`) against a local server on 127.0.0.1, with the C guest
//! (`guests/c`): allowed hosts, the allow-list escapes (address literals, redirects to
//! another host), the response cap and the call's deadline; and the same requests
//! through the `extism` SDK for comparison.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use deadlift_engine::{CallError, Grant};
use serde_json::{Value, json};

use crate::common::{self, TENANT, add, call};

/// A local HTTP/1.1 server on its own thread, one thread per connection; returns its
/// port. It answers a handful of paths and closes each connection after one response,
/// which is all these tests need (and keeps an HTTP framework out of the engine's
/// dependencies).
fn server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer(stream, port));
        }
    });
    port
}

fn answer(stream: TcpStream, port: u16) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip the headers: none of the routes reads them.
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
        header.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    // `/gate/N`: answers once N requests to it are waiting at once.
    if let Some(count) = path
        .strip_prefix("/gate/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        GATE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for _ in 0..2000 {
            if GATE.load(std::sync::atomic::Ordering::SeqCst) >= count {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (status, location, body) = match path {
        gate if gate.starts_with("/gate/") => ("200 OK", None, "open".to_owned()),
        "/count" => {
            COUNTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ("200 OK", None, "counted".to_owned())
        }
        "/hello" => ("200 OK", None, "hello from the test server".to_owned()),
        "/big" => ("200 OK", None, "x".repeat(10_000)),
        "/slow" => {
            std::thread::sleep(Duration::from_secs(5));
            ("200 OK", None, "late".to_owned())
        }
        "/to-hello" => ("302 Found", Some("/hello".to_owned()), String::new()),
        "/to-localhost" => (
            "302 Found",
            Some(format!("http://localhost:{port}/hello")),
            String::new(),
        ),
        _ => ("404 Not Found", None, "nothing here".to_owned()),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(location) = location {
        head.push_str(&format!("location: {location}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = reader.into_inner();
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

/// Requests the `/count` route answered.
static COUNTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Requests waiting at the `/gate/N` route.
static GATE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn grant() -> Grant {
    Grant::default()
        .allow(["reflect"])
        .with_timeout(Duration::from_millis(2000))
}

fn fetch(engine: &deadlift_engine::Engine, url: &str, grant: &Grant) -> Result<Value, CallError> {
    let module = add(engine, TENANT, "c_guest");
    let input = json!({ "url": url }).to_string();
    call(engine, &module, "fetch", input.as_bytes(), grant)
        .map(|out| serde_json::from_slice(&out.output).unwrap())
}

#[test]
fn allowed_hosts_are_fetched_with_status_body_and_redirects_on_the_same_host() {
    let port = server();
    let engine = common::engine();
    let allowed = grant().allow_host("127.0.0.1");
    let out = fetch(&engine, &format!("http://127.0.0.1:{port}/hello"), &allowed).unwrap();
    assert_eq!(
        out,
        json!({"status": 200, "body": "hello from the test server"})
    );
    let out = fetch(
        &engine,
        &format!("http://127.0.0.1:{port}/missing"),
        &allowed,
    )
    .unwrap();
    assert_eq!(out["status"], 404, "an error status is not an error");
    let out = fetch(
        &engine,
        &format!("http://127.0.0.1:{port}/to-hello"),
        &allowed,
    )
    .unwrap();
    assert_eq!(out["body"], "hello from the test server");
    // A name matched by a glob, whose (loopback) address the grant lists as well.
    let by_name = grant().allow_host("local*").allow_host("127.0.0.1");
    let out = fetch(&engine, &format!("http://localhost:{port}/hello"), &by_name).unwrap();
    assert_eq!(out["status"], 200);
}

/// Issue 11: `--allow-host '*'` reached `http://localhost:…`: names were not resolved
/// and checked, only address literals were.
#[test]
fn a_name_that_resolves_to_a_non_public_address_is_not_reached_by_a_glob() {
    let port = server();
    let engine = common::engine();
    for grant in [grant().allow_host("*"), grant().allow_host("localhost")] {
        match fetch(&engine, &format!("http://localhost:{port}/hello"), &grant) {
            Err(CallError::HttpDenied { reason, .. }) => {
                assert!(reason.contains("does not reach"), "{reason}")
            }
            other => panic!("localhost must not be reached: {other:?}"),
        }
    }
}

/// A guest that sends its input as the `http_request` document; 0 when the answer was
/// 200, 1 otherwise.
const RAW_REQUEST: &str = r#"
(module
  (import "extism:host/env" "input_offset" (func $input (result i64)))
  (import "extism:host/env" "http_request" (func $http (param i64 i64) (result i64)))
  (import "extism:host/env" "http_status_code" (func $status (result i32)))
  (memory (export "memory") 1)
  (func (export "send") (result i32)
    (drop (call $http (call $input) (i64.const 0)))
    (if (result i32) (i32.eq (call $status) (i32.const 200))
      (then (i32.const 0))
      (else (i32.const 1)))))
"#;

/// Issue 11: a guest could set any `Host` header (and the hop-by-hop ones).
#[test]
fn guests_cannot_set_the_host_or_hop_by_hop_headers() {
    let port = server();
    let engine = common::engine();
    let module = common::add_bytes(&engine, TENANT, "raw_request", common::wat(RAW_REQUEST));
    let allowed = grant().allow_host("127.0.0.1");
    for header in ["Host", "transfer-encoding", "Connection"] {
        let request = json!({
            "url": format!("http://127.0.0.1:{port}/hello"),
            "headers": { header: "internal.example" },
        });
        match call(
            &engine,
            &module,
            "send",
            request.to_string().as_bytes(),
            &allowed,
        ) {
            Err(CallError::HttpDenied { reason, .. }) => {
                assert!(reason.contains("set by the agent"), "{reason}")
            }
            other => panic!("{header} must be refused: {other:?}"),
        }
    }
    // Other headers are fine.
    let request = json!({
        "url": format!("http://127.0.0.1:{port}/hello"),
        "headers": { "x-request-id": "abc" },
    });
    let sent = call(
        &engine,
        &module,
        "send",
        request.to_string().as_bytes(),
        &allowed,
    );
    assert!(sent.is_ok(), "{sent:?}");
}

#[test]
fn hosts_outside_the_grant_are_denied_by_name() {
    let port = server();
    let engine = common::engine();
    let denied = |grant: &Grant, url: &str| match fetch(&engine, url, grant) {
        Err(CallError::HttpDenied { reason, .. }) => reason,
        other => panic!("{url} should be denied, got {other:?}"),
    };
    let url = format!("http://127.0.0.1:{port}/hello");
    // No list: no HTTP at all.
    assert!(denied(&grant(), &url).contains("`127.0.0.1`"));
    // A glob never reaches an address, not even `*`.
    assert!(denied(&grant().allow_host("*"), &url).contains("not in the grant"));
    // Userinfo is not the host.
    let trick = format!("http://127.0.0.1:{port}@localhost:{port}/hello");
    assert!(denied(&grant().allow_host("127.0.0.1"), &trick).contains("`localhost`"));
    // A redirect to a host outside the list is not followed.
    let reason = denied(
        &grant().allow_host("127.0.0.1"),
        &format!("http://127.0.0.1:{port}/to-localhost"),
    );
    assert!(
        reason.contains("redirected") && reason.contains("`localhost`"),
        "{reason}"
    );
    // Not HTTP.
    assert!(denied(&grant().allow_host("*"), "file:///etc/passwd").contains("http"));
}

#[test]
fn responses_over_the_cap_and_requests_past_the_deadline_fail() {
    let port = server();
    let engine = common::engine();
    let mut capped = grant().allow_host("127.0.0.1");
    capped.max_http_response_bytes = 1000;
    match fetch(&engine, &format!("http://127.0.0.1:{port}/big"), &capped) {
        Err(CallError::HostFunction { name, message }) => {
            assert_eq!(name, "http_request");
            assert!(message.contains("larger than 1000 bytes"), "{message}");
        }
        other => panic!("expected the cap to trip, got {other:?}"),
    }
    let short = grant()
        .allow_host("127.0.0.1")
        .with_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let result = fetch(&engine, &format!("http://127.0.0.1:{port}/slow"), &short);
    assert!(
        matches!(result, Err(CallError::Timeout { .. })),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the request did not outlive the call"
    );
}

#[test]
fn the_sdk_fetches_the_same() {
    let port = server();
    let engine = common::engine();
    let url = format!("http://127.0.0.1:{port}/hello");
    let ours = fetch(&engine, &url, &grant().allow_host("127.0.0.1")).unwrap();

    let manifest = extism::Manifest::new([extism::Wasm::data(common::fixture("c_guest"))])
        .with_allowed_host("127.0.0.1");
    let reflect = extism::Function::new(
        "reflect",
        [extism::PTR],
        [extism::PTR],
        extism::UserData::new(()),
        |plugin, inputs, outputs, _| {
            let bytes: Vec<u8> = plugin.memory_get_val(&inputs[0])?;
            let handle = plugin.memory_new(&bytes)?;
            outputs[0] = plugin.memory_to_val(handle);
            Ok(())
        },
    );
    let mut plugin = extism::Plugin::new(&manifest, [reflect], false).unwrap();
    let theirs: Vec<u8> = plugin
        .call("fetch", json!({ "url": url }).to_string())
        .unwrap();
    assert_eq!(ours, serde_json::from_slice::<Value>(&theirs).unwrap());
}

/// Issue 16: a call waiting on the network gives its worker back. Two workers, sixteen
/// calls whose requests are answered only once all sixteen are waiting at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_do_not_hold_the_workers() {
    let port = server();
    let engine = common::builder().workers(2).build().unwrap();
    let module = add(&engine, TENANT, "c_guest");
    let grant = grant()
        .allow_host("127.0.0.1")
        .with_timeout(Duration::from_secs(20));
    let input = json!({ "url": format!("http://127.0.0.1:{port}/gate/16") }).to_string();
    let calls = (0..16).map(|_| {
        let (engine, grant, input) = (engine.clone(), grant.clone(), input.clone());
        tokio::spawn(async move {
            let ctx = deadlift_engine::CallContext::new(TENANT);
            engine
                .call(&module, "fetch", input.as_bytes(), &grant, &ctx)
                .await
        })
    });
    for call in futures_util::future::join_all(calls).await {
        let out: Value = serde_json::from_slice(&call.unwrap().unwrap().output).unwrap();
        assert_eq!(out, json!({"status": 200, "body": "open"}));
    }
}

/// Issue 15: a recorded request is answered from the tape on replay; none is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_is_answered_from_the_tape_and_not_sent() {
    use deadlift_engine::tape::Tape;
    let port = server();
    let engine = common::engine();
    let module = add(&engine, TENANT, "c_guest");
    let grant = grant().allow_host("127.0.0.1");
    let input = json!({ "url": format!("http://127.0.0.1:{port}/count") }).to_string();
    let tape = Tape::recording();
    let ctx = deadlift_engine::CallContext::new(TENANT).with_tape(tape.clone());
    let live = engine
        .call(&module, "fetch", input.as_bytes(), &grant, &ctx)
        .await
        .unwrap();
    assert_eq!(COUNTED.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(tape.calls()[0].function, "http_request");
    let ctx = deadlift_engine::CallContext::new(TENANT).with_tape(Tape::replaying(tape.calls()));
    let replayed = engine
        .call(&module, "fetch", input.as_bytes(), &grant, &ctx)
        .await
        .unwrap();
    assert_eq!(replayed.output, live.output);
    assert_eq!(COUNTED.load(std::sync::atomic::Ordering::SeqCst), 1);
}
