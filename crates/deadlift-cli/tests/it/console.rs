//! The web console in a real browser: `deadlift showcase` serving its two agents, Debian's
//! headless Chromium driven through chromedriver (WebDriver) on loopback. Both are
//! installed by `scripts/browser` when missing.
//!
//! With `DEADLIFT_UPDATE_SCREENSHOTS=1` the test also writes the screenshots kept in
//! `docs/`.

use std::io::BufReader;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::BIN;

/// Long enough for a loaded machine; the page answers in milliseconds.
const PATIENCE: Duration = Duration::from_secs(20);

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root() -> String {
    format!("{}/../..", env!("CARGO_MANIFEST_DIR"))
}

/// Starts chromedriver on a free loopback port; returns it and its URL.
fn chromedriver() -> (Killed, String) {
    let installed = Command::new(format!("{}/scripts/browser", root()))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/browser runs");
    assert!(installed.status.success(), "scripts/browser failed");
    let driver = String::from_utf8(installed.stdout).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Killed(
        Command::new(driver.trim())
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts"),
    );
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, url);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("chromedriver did not listen on {url}");
}

async fn browser(driver: &str, profile: &std::path::Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(driver)
        .await
        .expect("a browser session")
}

/// Waits until the element `css` exists and its text contains `text`; returns the text.
async fn wait_text(client: &Client, css: &str, text: &str) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut seen = String::new();
    while std::time::Instant::now() < deadline {
        if let Ok(element) = client.find(Locator::Css(css)).await
            && let Ok(found) = element.text().await
        {
            if found.contains(text) {
                return found;
            }
            seen = found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("`{css}` never contained {text:?}; last seen: {seen:?}");
}

async fn sign_in(client: &Client, console: &Value, tenant: Option<&str>) {
    client.goto(console["url"].as_str().unwrap()).await.unwrap();
    let token = client
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#signin #token"))
        .await
        .unwrap();
    token
        .send_keys(console["token"].as_str().unwrap())
        .await
        .unwrap();
    if let Some(tenant) = tenant {
        client
            .find(Locator::Css("#signin #tenant"))
            .await
            .unwrap()
            .send_keys(tenant)
            .await
            .unwrap();
    }
    client
        .find(Locator::Css("#signin button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(client, "#whoami", console["agent"].as_str().unwrap()).await;
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    if std::env::var_os("DEADLIFT_UPDATE_SCREENSHOTS").is_some() {
        std::fs::write(format!("{}/docs/{name}.png", root()), png).unwrap();
    }
}

/// The page fits the window's width (nothing scrolls sideways but tables in their box).
async fn fits_the_width(client: &Client) -> bool {
    let fits = client
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
            Vec::new(),
        )
        .await
        .unwrap();
    fits == Value::Bool(true)
}

/// Sends an authenticated JSON request to an agent; returns the answer's JSON.
async fn api(
    method: reqwest::Method,
    url: String,
    token: &str,
    tenant: &str,
    body: Option<&str>,
) -> Value {
    let mut request = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token)
        .header("x-deadlift-tenant", tenant);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/toml")
            .body(body.to_owned());
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "{status}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Issue 14: a person signs in to each agent's console and sees the showcase's runs,
/// the one trace across both organisations, replays a dead letter, and is refused
/// another tenant's run.
#[test]
fn the_console_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let mut showcase = Command::new(BIN)
        .args(["showcase", "--json", "--data-dir"])
        .arg(dir.path().join("showcase"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = showcase.stdout.take().unwrap();
    let showcase = Killed(showcase);
    // The report is printed once the story is told; the agents then keep serving.
    let report: Value = serde_json::Deserializer::from_reader(BufReader::new(stdout))
        .into_iter::<Value>()
        .next()
        .expect("the showcase prints its report")
        .unwrap();
    let (payments, acme) = (&report["consoles"][0], &report["consoles"][1]);
    let trace = report["trace_id"].as_str().unwrap().to_owned();
    let acme_run = report["acme_run"]["id"].as_str().unwrap().to_owned();
    let hook_run = report["payments_run"]["id"].as_str().unwrap().to_owned();
    let (_driver, driver_url) = chromedriver();
    let profile = dir.path().join("profile");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let base = |console: &Value| {
            console["url"]
                .as_str()
                .unwrap()
                .trim_end_matches("/ui")
                .to_owned()
        };
        // A run the platform makes for its own tenant: Acme must not see it.
        let platform_admin = payments["admin_token"].as_str().unwrap();
        api(
            reqwest::Method::PUT,
            format!("{}/v1/workflows/internal", base(payments)),
            platform_admin,
            "default",
            Some("[[steps]]\nid = \"note\"\nemit = { type = \"internal.noted\" }\n"),
        )
        .await;
        let internal = api(
            reqwest::Method::POST,
            format!("{}/v1/workflows/internal/runs", base(payments)),
            platform_admin,
            "default",
            None,
        )
        .await;
        let internal = internal["run_id"]
            .as_str()
            .or(internal["id"].as_str())
            .unwrap_or_else(|| panic!("a run id in {internal}"))
            .to_owned();
        // A workflow on Acme's agent that fails, for a dead letter to replay.
        let acme_token = acme["token"].as_str().unwrap();
        api(
            reqwest::Method::PUT,
            format!("{}/v1/workflows/fragile", base(acme)),
            acme_token,
            "default",
            Some(
                // A run started over HTTP without input is not a discount: a guest error.
                "[[steps]]\nid = \"count\"\ncall = \"acme-satisfaction\"\nfunction = \"record_discount\"\n\
                 grant = { host_functions = [\"kv_get\", \"kv_set\"] }\n",
            ),
        )
        .await;
        api(
            reqwest::Method::POST,
            format!("{}/v1/workflows/fragile/runs", base(acme)),
            acme_token,
            "default",
            None,
        )
        .await;

        let client = browser(&driver_url, &profile).await;

        // Acme on its own agent: its runs, live.
        sign_in(&client, acme, None).await;
        client.goto(&format!("{}#/runs", acme["url"].as_str().unwrap())).await.unwrap();
        wait_text(&client, &format!("tr[data-run-id=\"{acme_run}\"]"), "satisfaction").await;
        screenshot(&client, "console-runs").await;

        // One trace across both organisations: the platform's hook run and Acme's own.
        client
            .goto(&format!("{}#/traces/{trace}", acme["url"].as_str().unwrap()))
            .await
            .unwrap();
        wait_text(&client, "#waterfall", "before_charge").await;
        let waterfall = wait_text(&client, "#waterfall", "satisfaction").await;
        assert!(waterfall.contains("record_discount") || waterfall.contains("aggregate"), "{waterfall}");
        let sides: Vec<String> = {
            let mut sides = Vec::new();
            for element in client.find_all(Locator::Css("#waterfall [data-side]")).await.unwrap() {
                sides.push(element.attr("data-side").await.unwrap().unwrap_or_default());
            }
            sides
        };
        for side in [payments["agent"].as_str().unwrap(), acme["agent"].as_str().unwrap()] {
            assert!(sides.iter().any(|s| s == side), "side {side} in {sides:?}");
        }
        assert!(
            client
                .find(Locator::Css(&format!("#waterfall [data-run-id=\"{hook_run}\"]")))
                .await
                .is_ok(),
            "the platform's run is in the waterfall"
        );
        screenshot(&client, "console-trace").await;

        // The peer whose side the trace showed is listed, its token never shown.
        client
            .goto(&format!("{}#/peers", acme["url"].as_str().unwrap()))
            .await
            .unwrap();
        let listed = wait_text(&client, "#peer-views-table", payments["agent"].as_str().unwrap()).await;
        assert!(!listed.contains(payments["token"].as_str().unwrap()));

        // A dead letter, replayed: its run goes again (and, still failing, is dead again).
        let letters = format!("{}/v1/dead-letters?include_replayed=true", base(acme));
        let before = api(reqwest::Method::GET, letters.clone(), acme_token, "default", None).await;
        let letter = before
            .as_array()
            .or(before["dead_letters"].as_array())
            .and_then(|all| all.iter().find(|l| l["workflow"] == "fragile"))
            .unwrap_or_else(|| panic!("a dead letter of `fragile` in {before}"))
            .clone();
        client
            .goto(&format!("{}#/dead-letters", acme["url"].as_str().unwrap()))
            .await
            .unwrap();
        let replay = client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(&format!(
                "#dead-letters-table button[data-replay=\"{}\"]",
                letter["id"]
            )))
            .await
            .unwrap();
        replay.click().await.unwrap();
        wait_text(&client, "#notice", letter["run_id"].as_str().unwrap()).await;
        let mut again = Value::Null;
        for _ in 0..100 {
            let after = api(reqwest::Method::GET, letters.clone(), acme_token, "default", None).await;
            again = after
                .as_array()
                .or(after["dead_letters"].as_array())
                .and_then(|all| all.iter().find(|l| l["id"] == letter["id"]))
                .cloned()
                .unwrap_or(Value::Null);
            if again != letter {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_ne!(again, letter, "the replay changed nothing");

        // On a phone, the trace still fits the screen's width.
        client.set_window_size(390, 844).await.unwrap();
        client
            .goto(&format!("{}#/traces/{trace}", acme["url"].as_str().unwrap()))
            .await
            .unwrap();
        wait_text(&client, "#waterfall", "satisfaction").await;
        assert!(fits_the_width(&client).await, "the trace page scrolls sideways on a phone");
        screenshot(&client, "console-phone").await;
        client.set_window_size(1280, 800).await.unwrap();

        // Acme on the platform's agent: its hook run is there; the platform's own run is not.
        client.goto(payments["url"].as_str().unwrap()).await.unwrap();
        client
            .execute("sessionStorage.clear(); location.reload();", Vec::new())
            .await
            .unwrap();
        sign_in(&client, payments, None).await;
        client
            .goto(&format!("{}#/runs", payments["url"].as_str().unwrap()))
            .await
            .unwrap();
        wait_text(&client, &format!("tr[data-run-id=\"{hook_run}\"]"), "before_charge").await;
        assert!(
            client
                .find(Locator::Css(&format!("tr[data-run-id=\"{internal}\"]")))
                .await
                .is_err(),
            "another tenant's run is listed"
        );
        client
            .goto(&format!("{}#/runs/{internal}", payments["url"].as_str().unwrap()))
            .await
            .unwrap();
        wait_text(&client, "#error", "run_not_found").await;

        // The operator of the platform: tenants, policy, peers and the outbox.
        client
            .execute("sessionStorage.clear();", Vec::new())
            .await
            .unwrap();
        let operator = json!({
            "url": payments["url"], "agent": payments["agent"], "token": platform_admin,
        });
        sign_in(&client, &operator, None).await;
        client
            .goto(&format!("{}#/operator", payments["url"].as_str().unwrap()))
            .await
            .unwrap();
        wait_text(&client, "#tenant-list", "acme").await;
        wait_text(&client, "#peers-table", acme["agent"].as_str().unwrap()).await;
        wait_text(&client, "#outbox-table", "delivered").await;
        wait_text(&client, "#policy-json", "max_timeout_ms").await;

        // Acme on the platform's agent again, where its loyalty v2 is a canary beside v1
        // (last: rolling it back changes what serves the name).
        client
            .execute("sessionStorage.clear();", Vec::new())
            .await
            .unwrap();
        sign_in(&client, payments, None).await;
        let payments_url = payments["url"].as_str().unwrap();
        let acme_on_payments = payments["token"].as_str().unwrap();
        // A charge's step says which version of the name served it...
        assert_eq!(report["payments_run"]["steps"][0]["version"], "1");
        client
            .goto(&format!("{payments_url}#/runs/{hook_run}"))
            .await
            .unwrap();
        client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css("#waterfall [data-step] summary"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_text(&client, "#waterfall .step-version", "version 1").await;
        // ...and, when the canary served it, says so (the showcase's charges fall on
        // either side at random: when its report has one on the canary's side).
        let runs = api(
            reqwest::Method::GET,
            format!("{}/v1/runs?limit=50", base(payments)),
            acme_on_payments,
            "acme",
            None,
        )
        .await;
        let mut canary_run = None;
        for run in runs["runs"].as_array().unwrap() {
            let id = run["id"].as_str().unwrap();
            let run = api(
                reqwest::Method::GET,
                format!("{}/v1/runs/{id}", base(payments)),
                acme_on_payments,
                "acme",
                None,
            )
            .await;
            let steps = run["steps"].as_array().cloned().unwrap_or_default();
            if steps.iter().any(|step| step["canary"] == true) {
                canary_run = Some(id.to_owned());
                break;
            }
        }
        let canary_charged = report["canary_charges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|charge| charge["canary"] == true);
        assert_eq!(canary_run.is_some(), canary_charged, "{}", report["canary_charges"]);
        if let Some(canary_run) = canary_run {
            client
                .goto(&format!("{payments_url}#/runs/{canary_run}"))
                .await
                .unwrap();
            client
                .wait()
                .at_most(PATIENCE)
                .for_element(Locator::Css("#waterfall [data-step] summary"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
            wait_text(&client, "#waterfall .step-version", "version 2").await;
            wait_text(&client, "#waterfall .wf-details .status-canary", "canary").await;
        }

        // The module's release: v1 live, v2 a canary on half the calls; rolled back.
        client
            .goto(&format!("{payments_url}#/modules/acme-loyalty"))
            .await
            .unwrap();
        let summary = wait_text(&client, "#release .release-summary", "acme-loyalty@1").await;
        assert!(summary.contains("canary of acme-loyalty@2"), "{summary}");
        let rollout = wait_text(&client, "#release-rollout", "acme-loyalty@2").await;
        assert!(rollout.contains("canary") && rollout.contains("50%"), "{rollout}");
        wait_text(&client, "#release-window-table", "Candidate").await;
        wait_text(&client, "#release-history-table", "rollout").await;
        wait_text(&client, "#module-versions", "acme-loyalty @2").await;
        assert!(
            client.find(Locator::Css("#release-promote")).await.is_ok(),
            "no promote button during a rollout"
        );
        client.set_window_size(390, 844).await.unwrap();
        assert!(fits_the_width(&client).await, "the module page scrolls sideways on a phone");
        client.set_window_size(1280, 800).await.unwrap();
        client
            .find(Locator::Css("#release-rollback"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_text(&client, "#notice", "Rolled back").await;
        wait_text(&client, "#release-history-table tbody tr:first-child", "rolled_back").await;
        let summary = wait_text(&client, "#release .release-summary", "none in progress").await;
        assert!(summary.contains("acme-loyalty@1"), "{summary}");
        for gone in ["#release-rollout", "#release-promote", "#release-rollback"] {
            assert!(
                client.find(Locator::Css(gone)).await.is_err(),
                "`{gone}` is still shown after the rollback"
            );
        }
        // The agent says the same.
        let release = api(
            reqwest::Method::GET,
            format!("{}/v1/modules/acme-loyalty/release", base(payments)),
            acme_on_payments,
            "acme",
            None,
        )
        .await;
        assert!(release.get("rollout").is_none(), "{release}");
        assert_eq!(release["live"]["version"], "1", "{release}");
        assert_eq!(release["history"][0]["action"], "rolled_back", "{release}");

        client.close().await.unwrap();
    });
    drop(showcase);
}
