//! Two real agents on loopback: signed delivery of events from one to the other, and
//! every way a delivery can be refused or go wrong (tampering, replays, a wrong key, an
//! unaccepted type, a stale timestamp, a peer that is down).

use std::time::Duration;

use deadlift::federation::{Identity, Webhook};
use serde_json::{Value, json};

use crate::{Server, fixture};

/// A loopback address with a port free right now.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn json_out(server: &Server, token: &str, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--json");
    serde_json::from_str(&server.ok(Some(token), &all)).unwrap()
}

/// POSTs `body` with `headers`; the status and the JSON answer.
fn post(url: &str, headers: &[(&str, String)], body: String) -> (u16, Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut request = reqwest::Client::new().post(url).body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    })
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    for _ in 0..300 {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn agents_deliver_signed_events_and_refuse_bad_deliveries() {
    let (payments_dir, acme_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let acme_address = free_address();
    let payments = Server::start_with(payments_dir.path(), &[("DEADLIFT_NAME", "payments")]);
    let mut acme = Server::start_on(acme_dir.path(), &acme_address, &[("DEADLIFT_NAME", "acme")]);
    let payments_admin = payments.admin_token.clone().unwrap();
    let acme_admin = acme.admin_token.clone().unwrap();

    let payments_id = json_out(&payments, &payments_admin, &["identity"]);
    let acme_id = json_out(&acme, &acme_admin, &["identity"]);
    assert_eq!(payments_id["name"], "payments");
    payments.ok(
        Some(&payments_admin),
        &[
            "peer",
            "add",
            "acme",
            &acme.url,
            "--public-key",
            acme_id["public_key"].as_str().unwrap(),
            "--send",
            "discount.>",
            "--local-tenant",
            "default",
        ],
    );
    acme.ok(
        Some(&acme_admin),
        &[
            "peer",
            "add",
            "payments",
            &payments.url,
            "--public-key",
            payments_id["public_key"].as_str().unwrap(),
            "--accept",
            "discount.>",
            "--local-tenant",
            "default",
        ],
    );
    let listed = acme.ok(Some(&acme_admin), &["peer", "list"]);
    assert!(
        listed.contains("payments") && listed.contains("discount.>"),
        "{listed}"
    );

    // Acme runs a workflow for each discount it hears about.
    let add_ten = fixture("add_ten");
    acme.ok(
        Some(&acme_admin),
        &[
            "module", "push", &add_ten, "--name", "adder", "--tenant", "default",
        ],
    );
    let file = acme_dir.path().join("discounts.toml");
    std::fs::write(
        &file,
        "trigger = { event = \"discount.sent\" }\n[[steps]]\nid = \"add\"\ncall = \"adder\"\n",
    )
    .unwrap();
    acme.ok(
        Some(&acme_admin),
        &[
            "workflow",
            "apply",
            file.to_str().unwrap(),
            "--tenant",
            "default",
        ],
    );

    let runs_of = |server: &Server, token: &str, event: &str| -> Vec<Value> {
        json_out(
            server,
            token,
            &["runs", "list", "--event", event, "--tenant", "default"],
        )["runs"]
            .as_array()
            .unwrap()
            .clone()
    };
    payments.ok(
        Some(&payments_admin),
        &[
            "event",
            "publish",
            "discount.sent",
            "--data",
            "5",
            "--id",
            "d-1",
            "--tenant",
            "default",
        ],
    );
    wait_for(
        || {
            runs_of(&acme, &acme_admin, "d-1")
                .iter()
                .any(|r| r["status"] == "succeeded")
        },
        "the delivered event's run on acme",
    );
    let run_id = runs_of(&acme, &acme_admin, "d-1")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let run = json_out(
        &acme,
        &acme_admin,
        &["runs", "show", &run_id, "--tenant", "default"],
    );
    assert_eq!(run["output"], 15);
    // The run on acme belongs to the trace the event started on payments.
    let trace = run["event"]["traceparent"]
        .as_str()
        .unwrap()
        .split('-')
        .nth(1)
        .unwrap()
        .to_owned();
    assert_eq!(run["trace_id"], trace.as_str());
    let delivered = json_out(&payments, &payments_admin, &["peer", "outbox"]);
    assert_eq!(delivered[0]["status"], "delivered", "{delivered}");

    // An `emit` step addressed to the peer: delivered there, not routed here.
    let notify = payments_dir.path().join("notify.toml");
    std::fs::write(
        &notify,
        "[[steps]]\nid = \"tell\"\nemit = { type = \"discount.sent\", data = \"input\", to = \"acme\" }\n",
    )
    .unwrap();
    let local = payments_dir.path().join("local.toml");
    std::fs::write(&local, "trigger = { event = \"discount.sent\" }\n[[steps]]\nid = \"never\"\nemit = { type = \"x.y\" }\n").unwrap();
    for file in [&notify, &local] {
        payments.ok(
            Some(&payments_admin),
            &[
                "workflow",
                "apply",
                file.to_str().unwrap(),
                "--tenant",
                "default",
            ],
        );
    }
    let told = json_out(
        &payments,
        &payments_admin,
        &[
            "workflow", "run", "notify", "--input", "7", "--wait", "--tenant", "default",
        ],
    );
    assert_eq!(told["status"], "succeeded", "{told}");
    let addressed = told["steps"][0]["emitted"][0].as_str().unwrap().to_owned();
    wait_for(
        || {
            runs_of(&acme, &acme_admin, &addressed)
                .iter()
                .any(|r| r["status"] == "succeeded")
        },
        "the addressed event's run on acme",
    );
    assert!(
        runs_of(&payments, &payments_admin, &addressed).is_empty(),
        "not routed locally"
    );
    let nowhere = payments_dir.path().join("nowhere.toml");
    std::fs::write(
        &nowhere,
        "[[steps]]\nid = \"tell\"\nemit = { type = \"discount.sent\", to = \"nobody\" }\n",
    )
    .unwrap();
    payments.ok(
        Some(&payments_admin),
        &[
            "workflow",
            "apply",
            nowhere.to_str().unwrap(),
            "--tenant",
            "default",
        ],
    );
    // The waited run fails: the command prints it and exits 1.
    let out = payments.cli(
        Some(&payments_admin),
        &[
            "workflow", "run", "nowhere", "--wait", "--tenant", "default", "--json",
        ],
    );
    assert!(!out.status.success());
    let failed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(failed["error"]["code"], "peer_not_found", "{failed}");

    // Hand-made deliveries, signed with payments' own key (read from its data dir).
    let signer = Identity::load_or_create(payments_dir.path(), "payments").unwrap();
    let stranger =
        Identity::load_or_create(tempfile::tempdir().unwrap().path(), "payments").unwrap();
    let deliver = |identity: &Identity,
                   sender: &str,
                   id: &str,
                   event_type: &str,
                   tamper: bool,
                   skew: i64| {
        let body = json!({"specversion": "1.0", "id": id, "source": "/payments", "type": event_type, "data": 1}).to_string();
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + skew;
        let signed = Webhook::sign(identity, id.to_owned(), timestamp, body.as_bytes());
        let sent = if tamper {
            body.replace("\"data\":1", "\"data\":2")
        } else {
            body
        };
        post(
            &format!("{}/v1/peer/events", acme.url),
            &[
                ("content-type", "application/cloudevents+json".to_owned()),
                ("webhook-id", id.to_owned()),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", signed.signature),
                ("deadlift-peer", sender.to_owned()),
            ],
            sent,
        )
    };
    let code = |answer: (u16, Value)| {
        (
            answer.0,
            answer.1["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    assert_eq!(
        code(deliver(
            &signer,
            "payments",
            "h-1",
            "discount.sent",
            true,
            0
        )),
        (401, "signature_invalid".into())
    );
    assert_eq!(
        code(deliver(
            &stranger,
            "payments",
            "h-1",
            "discount.sent",
            false,
            0
        )),
        (401, "signature_invalid".into())
    );
    assert_eq!(
        code(deliver(&signer, "nobody", "h-1", "discount.sent", false, 0)),
        (401, "peer_unknown".into())
    );
    assert_eq!(
        code(deliver(
            &signer,
            "payments",
            "h-1",
            "discount.sent",
            false,
            -3600
        )),
        (401, "signature_expired".into())
    );
    assert_eq!(
        code(deliver(
            &signer,
            "payments",
            "h-1",
            "orders.created",
            false,
            0
        )),
        (403, "event_not_accepted".into())
    );
    // A replayed delivery is answered again but has one effect.
    for _ in 0..2 {
        assert_eq!(
            deliver(&signer, "payments", "h-2", "discount.sent", false, 0).0,
            200
        );
    }
    wait_for(
        || !runs_of(&acme, &acme_admin, "h-2").is_empty(),
        "the hand-made delivery's run",
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(runs_of(&acme, &acme_admin, "h-2").len(), 1);
    assert!(
        runs_of(&acme, &acme_admin, "h-1").is_empty(),
        "refused deliveries start nothing"
    );

    // A peer that is down gets everything once it is back.
    acme.child.kill().unwrap();
    acme.child.wait().unwrap();
    for id in ["d-2", "d-3"] {
        payments.ok(
            Some(&payments_admin),
            &[
                "event",
                "publish",
                "discount.sent",
                "--data",
                "1",
                "--id",
                id,
                "--tenant",
                "default",
            ],
        );
    }
    wait_for(
        || {
            json_out(
                &payments,
                &payments_admin,
                &["peer", "outbox", "--status", "pending"],
            )
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["attempts"].as_i64().unwrap_or(0) >= 1)
        },
        "a failed delivery attempt while acme is down",
    );
    drop(acme);
    let acme = Server::start_on(acme_dir.path(), &acme_address, &[("DEADLIFT_NAME", "acme")]);
    for id in ["d-2", "d-3"] {
        wait_for(
            || {
                runs_of(&acme, &acme_admin, id)
                    .iter()
                    .any(|r| r["status"] == "succeeded")
            },
            "delivery after the peer came back",
        );
        assert_eq!(runs_of(&acme, &acme_admin, id).len(), 1);
    }
}

#[test]
fn the_showcase_tells_the_whole_story() {
    let out = std::process::Command::new(crate::BIN)
        .args(["showcase", "--json", "--exit"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The charge goes through, and Acme's plug-in found the loyal customer.
    assert_eq!(report["hook_output"]["approve"], true);
    assert_eq!(report["hook_output"]["discount_sent"], true);
    assert!(report["hook_output"]["similar_purchases"].as_u64().unwrap() >= 10);
    // The platform sent the email on Acme's behalf.
    let email = &report["emails"][0];
    assert_eq!(email["from_tenant"], "acme");
    assert_eq!(email["to"], "cus_ada");
    assert!(email["body"].as_str().unwrap().contains("10% off"));
    // Both runs, with their steps and logs, share one trace id.
    let trace = report["trace_id"].as_str().unwrap();
    for side in ["payments_run", "acme_run"] {
        assert_eq!(report[side]["status"], "succeeded", "{side}");
        assert_eq!(report[side]["trace_id"], trace, "{side}");
        assert_eq!(report[side]["steps"].as_array().unwrap().len(), 1, "{side}");
    }
    assert_eq!(report["payments_run"]["workflow"], "hook:before_charge");
    // Issue 15: Acme's loyalty v2 (threshold 15) replayed on the platform's recorded
    // charges: only Ada's outcome changes, and nothing is sent again.
    let v2 = &report["loyalty_v2"];
    assert_eq!(
        (
            v2["total"].as_u64(),
            v2["changed"].as_u64(),
            v2["identical"].as_u64()
        ),
        (Some(3), Some(1), Some(2)),
        "{v2}"
    );
    let changed: Vec<&Value> = v2["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "changed")
        .collect();
    assert_eq!(changed[0]["input"]["customer"], "cus_ada");
    assert_eq!(changed[0]["replayed"]["output"]["discount_sent"], false);
    let sent_to: Vec<&str> = report["emails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(sent_to, ["cus_ada", "cus_bob"], "the replay sent no email");
    assert!(
        report["payments_run"]["steps"][0]["logs"][0]["message"]
            .as_str()
            .unwrap()
            .contains("discount email sent")
    );
    // Then v2 as a canary: each charge says which version served it, and what it did
    // is that version's (Ada, with 12 purchases, gets a discount from v1 only).
    let rollout = &report["rollout"]["rollout"];
    assert_eq!(rollout["mode"], "canary", "{}", report["rollout"]);
    assert_eq!(rollout["candidate"]["version"], "2");
    assert_eq!(report["rollout"]["live"]["version"], "1");
    let charges = report["canary_charges"].as_array().unwrap();
    assert_eq!(charges.len(), 6);
    for charge in charges {
        let canary = charge["canary"] == true;
        assert_eq!(
            charge["version"],
            if canary { "2" } else { "1" },
            "{charge}"
        );
        if charge["customer"] == "cus_ada" {
            assert_eq!(charge["discount_sent"], !canary, "{charge}");
        }
    }
    let served = report["rollout"]["window"]["candidate_calls"]
        .as_u64()
        .unwrap()
        + report["rollout"]["window"]["live_calls"].as_u64().unwrap();
    assert_eq!(served, 6, "{}", report["rollout"]);
    assert_eq!(report["acme_run"]["workflow"], "satisfaction");
    assert_eq!(report["acme_run"]["event"]["type"], "discount.sent");
    // Acme's counters.
    assert_eq!(
        report["acme_counters"],
        json!({"discounts": 1, "discounts:cus_ada": 1})
    );
}
