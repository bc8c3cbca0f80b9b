//! `deadlift showcase`: the payments ↔ merchant story (`docs/overview.md`, "The showcase story"), with two real agents
//! talking HTTP on loopback in this process.
//!
//! The payments platform embeds the library. It offers the host functions
//! `lookup_purchases` (its own purchase table) and `send_email` (an outbox it prints), and
//! declares the hook `before_charge`. Acme, a merchant, pushes its plug-in to the payments
//! agent over HTTP and binds it there. A charge calls the hook. The plug-in finds ten or
//! more similar purchases and sends a discount email. The payments side then emits
//! `discount.sent`, which is signed and delivered to Acme's own agent. There a workflow
//! counts it in KV. The report shows what each side sees, joined by one trace id.
//!
//! Then both agents keep serving (until Ctrl-C, or not at all with `--exit`), and the
//! report ends with each one's web console and a token to sign in with. Acme's tenant
//! holds a token on the platform's agent too (a peer view), so Acme's console shows the
//! platform's `before_charge` run and its own `satisfaction` run in one trace.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use deadlift::federation::peers::Peer;
use deadlift::hooks::HookDecl;
use deadlift::store::Principal;
use deadlift::workflow::{Run, RunFilter};
use deadlift::{Agent, Grant, HostError, HostFunction};
use serde::Serialize;
use serde_json::{Value, json};

use crate::client::print_json;

/// How long the platform's purchase database takes to answer, simulated.
const DATABASE_LATENCY: Duration = Duration::from_millis(5);

const ACME_LOYALTY: &[u8] = include_bytes!("../../../guests/wasm/acme_loyalty.wasm");
/// The same plug-in, loyal from 15 similar purchases rather than 10.
const ACME_LOYALTY_V2: &[u8] = include_bytes!("../../../guests/wasm/acme_loyalty_v2.wasm");
/// The share of charges loyalty v2 serves as a canary: high, so that a handful of
/// charges shows both sides.
const CANARY_PERCENT: f64 = 50.0;
const ACME_SATISFACTION: &[u8] = include_bytes!("../../../guests/wasm/acme_satisfaction.wasm");

const SATISFACTION_WORKFLOW: &str = r#"
name = "satisfaction"
description = "Aggregate discounts sent by the payments platform"
trigger = { event = "discount.sent" }

[[steps]]
id = "aggregate"
call = "acme-satisfaction"
function = "record_discount"
grant = { host_functions = ["kv_get", "kv_set"], timeout_ms = 2000, fuel = 50_000_000 }
retry = { attempts = 3, initial_ms = 50 }
"#;

/// One purchase in the payments platform's own table.
#[derive(Debug, Clone, Serialize)]
struct Purchase {
    customer: &'static str,
    merchant: &'static str,
    category: &'static str,
    amount_cents: u64,
    days_ago: u64,
}

/// An email the payments platform was asked to send.
#[derive(Debug, Clone, Serialize)]
pub struct Email {
    pub from_tenant: String,
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// What each side sees at the end.
#[derive(Debug, Serialize)]
pub struct Report {
    pub charge: Value,
    pub hook_output: Value,
    /// The emails sent before the rollout.
    pub emails: Vec<Email>,
    pub trace_id: String,
    pub payments_run: Run,
    pub acme_run: Run,
    pub acme_counters: Value,
    /// Acme tries a loyalty v2 (a threshold of 15) against the charges the platform
    /// recorded: the replay report.
    pub loyalty_v2: Value,
    /// Then rolls it out as a canary: the release as the platform's agent shows it...
    pub rollout: Value,
    /// ...and the charges that came in next, each with the version that served it.
    pub canary_charges: Vec<ServedCharge>,
    /// Each agent's web console, with a token to sign in with.
    pub consoles: Vec<Console>,
}

/// A charge during the canary, and which loyalty version served it.
#[derive(Debug, Serialize)]
pub struct ServedCharge {
    pub charge_id: String,
    pub customer: String,
    pub version: Option<String>,
    pub canary: bool,
    pub discount_sent: bool,
}

/// Where to see one agent's side, and as whom.
#[derive(Debug, Serialize)]
pub struct Console {
    pub agent: String,
    pub url: String,
    /// The tenant the token signs in as.
    pub tenant: String,
    pub token: String,
    /// The agent's admin token, for its operator pages (act as `tenant`).
    pub admin_token: String,
}

/// The story told, with its two agents still serving.
pub struct Story {
    pub report: Report,
    agents: Vec<Running>,
}

impl Story {
    /// Stops both agents.
    pub async fn stop(self) {
        for agent in self.agents {
            stop(agent).await;
        }
    }
}

fn purchases() -> Vec<Purchase> {
    let mut table: Vec<Purchase> = (0..12)
        .map(|i| Purchase {
            customer: "cus_ada",
            merchant: "acme",
            category: "coffee",
            amount_cents: 350 + i * 10,
            days_ago: 1 + i * 2,
        })
        .collect();
    table.push(Purchase {
        customer: "cus_ada",
        merchant: "acme",
        category: "coffee",
        amount_cents: 400,
        days_ago: 45,
    });
    table.push(Purchase {
        customer: "cus_ada",
        merchant: "globex",
        category: "coffee",
        amount_cents: 500,
        days_ago: 3,
    });
    // Two more of Acme's customers: one very loyal, one new.
    for (customer, count) in [("cus_bob", 16), ("cus_cy", 3)] {
        table.extend((0..count).map(|i| Purchase {
            customer,
            merchant: "acme",
            category: "coffee",
            amount_cents: 300 + i * 5,
            days_ago: 1 + i,
        }));
    }
    table
}

struct Running {
    agent: Arc<Agent>,
    url: String,
    admin: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(builder: deadlift::AgentBuilder) -> anyhow::Result<Running> {
    let admin = deadlift::agent::new_token()?;
    let (agent, _) = builder.admin_token(Some(admin.clone())).build()?;
    let agent = Arc::new(agent);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(deadlift::server::serve(agent.clone(), listener, async {
        let _ = stopped.await;
    }));
    Ok(Running {
        agent,
        url,
        admin,
        stop,
        task,
    })
}

async fn stop(running: Running) {
    let _ = running.stop.send(());
    let _ = running.task.await;
    running.agent.shutdown().await;
}

/// Sends a request and returns its JSON answer, failing on a non-2xx status.
async fn call(request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request.send().await?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// `deadlift showcase`: runs the story in `data_dir`, or in a temporary directory that is
/// removed afterwards (also when the story fails), prints the report, and serves both
/// agents' consoles until `stopped` completes (unless `exit`).
pub async fn command(
    data_dir: Option<PathBuf>,
    json: bool,
    exit: bool,
    stopped: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (dir, temporary) = match data_dir {
        Some(dir) => (dir, false),
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir()
                .join(format!("deadlift-showcase-{}-{stamp}", std::process::id()));
            (dir, true)
        }
    };
    let outcome = match run(dir.clone()).await {
        Ok(story) => {
            let shown = if json {
                serde_json::to_value(&story.report)
                    .map_err(anyhow::Error::from)
                    .and_then(|report| print_json(&report))
            } else {
                print(&story.report, !exit);
                Ok(())
            };
            if shown.is_ok() && !exit {
                use std::io::Write;
                let _ = std::io::stdout().flush();
                stopped.await;
            }
            story.stop().await;
            shown
        }
        Err(error) => Err(error),
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

/// Runs the story in `dir` (fresh agent data directories under it); the agents keep
/// serving until the story is stopped.
pub async fn run(dir: PathBuf) -> anyhow::Result<Story> {
    let emails = Arc::new(Mutex::new(Vec::<Email>::new()));
    let table = Arc::new(purchases());

    // The payments platform: its data, its host functions, its extension point. The
    // purchase table stands for the platform's database: a query takes a few
    // milliseconds, awaited (an async host function), so a waiting plug-in holds no
    // thread.
    let lookup = {
        let table = table.clone();
        HostFunction::json_async("lookup_purchases", move |ctx, request| {
            let table = table.clone();
            async move {
                tokio::time::sleep(DATABASE_LATENCY).await;
                let customer = request["customer"].as_str().unwrap_or_default();
                let days = request["days"].as_u64().unwrap_or(30);
                // A merchant's plug-in sees that merchant's purchases only.
                let found: Vec<&Purchase> = table
                    .iter()
                    .filter(|p| {
                        p.customer == customer && p.merchant == ctx.tenant && p.days_ago <= days
                    })
                    .collect();
                Ok(json!({ "purchases": found }))
            }
        })
    };
    let send_email = {
        let emails = emails.clone();
        HostFunction::json("send_email", move |ctx, request| {
            let field = |name: &str| {
                request[name]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| HostError::new(format!("send_email needs a string `{name}`")))
            };
            let mut outbox = emails.lock().unwrap_or_else(PoisonError::into_inner);
            outbox.push(Email {
                from_tenant: ctx.tenant.clone(),
                to: field("to")?,
                subject: field("subject")?,
                body: field("body")?,
            });
            Ok(json!({ "queued": true, "id": format!("email_{}", outbox.len()) }))
        })
    };
    // Two seconds: the first call also makes the instance, and the showcase runs on
    // machines busy with other things (its own tests run beside a browser).
    let hook_grant = Grant::default()
        .allow(["lookup_purchases", "send_email"])
        .with_timeout(Duration::from_secs(2))
        .with_fuel(50_000_000);
    let payments = start(
        Agent::builder(dir.join("payments"))
            .name("payments")
            .host_function(lookup)
            .host_function(send_email)
            .hook(
                HookDecl::new("before_charge", hook_grant)
                    .describe("runs before a card is charged"),
            ),
    )
    .await
    .context("starting the payments agent")?;
    let acme = start(Agent::builder(dir.join("acme")).name("acme"))
        .await
        .context("starting Acme's agent")?;

    // The platform makes Acme a tenant and gives it a token.
    let db = payments.agent.db().clone();
    db.create_tenant("acme")?;
    let acme_token = deadlift::agent::new_token()?;
    db.add_token(&acme_token, &Principal::Tenant("acme".into()), Some("Acme"))?;

    // The two agents know each other's keys; discounts flow from payments to Acme.
    let payments_identity = payments.agent.federation().identity().clone();
    let acme_identity = acme.agent.federation().identity().clone();
    payments
        .agent
        .federation()
        .add_peer(Peer {
            name: acme_identity.name.clone(),
            url: acme.url.clone(),
            public_key: acme_identity.public_key(),
            tenant: "acme".into(),
            send: vec!["discount.>".into()],
            accept: Vec::new(),
            created_unix_ms: 0,
        })
        .await?;
    acme.agent
        .federation()
        .add_peer(Peer {
            name: payments_identity.name.clone(),
            url: payments.url.clone(),
            public_key: payments_identity.public_key(),
            tenant: "default".into(),
            send: Vec::new(),
            accept: vec!["discount.>".into()],
            created_unix_ms: 0,
        })
        .await?;

    // Acme's own people sign in to Acme's agent with a tenant token, and Acme's tenant
    // there holds its platform token as a view of that peer: one trace, both sides.
    let acme_own_token = deadlift::agent::new_token()?;
    acme.agent.db().add_token(
        &acme_own_token,
        &Principal::Tenant(deadlift::DEFAULT_TENANT.into()),
        Some("Acme's console"),
    )?;
    acme.agent
        .federation()
        .set_view_token(
            deadlift::DEFAULT_TENANT,
            &payments_identity.name,
            &acme_token,
        )
        .await?;

    // Acme, over HTTP: its plug-in goes to the platform, bound at `before_charge`...
    let http = reqwest::Client::new();
    call(
        http.post(format!("{}/v1/modules", payments.url))
            .bearer_auth(&acme_token)
            .query(&[("name", "acme-loyalty"), ("version", "1")])
            .body(ACME_LOYALTY.to_vec()),
    )
    .await
    .context("Acme pushing its plug-in to the platform")?;
    call(
        http.put(format!("{}/v1/hooks/before_charge/binding", payments.url))
            .bearer_auth(&acme_token)
            .json(&json!({"module": "acme-loyalty", "function": "before_charge"})),
    )
    .await
    .context("Acme binding its plug-in")?;
    // ...and its own workflow on its own agent.
    let own = |request: reqwest::RequestBuilder| {
        request
            .bearer_auth(&acme.admin)
            .header("x-deadlift-tenant", "default")
    };
    call(
        own(http.post(format!("{}/v1/modules", acme.url)))
            .query(&[("name", "acme-satisfaction")])
            .body(ACME_SATISFACTION.to_vec()),
    )
    .await?;
    call(
        own(http.put(format!("{}/v1/workflows/satisfaction", acme.url)))
            .header("content-type", "application/toml")
            .body(SATISFACTION_WORKFLOW),
    )
    .await?;

    // A charge comes in.
    let charge = json!({
        "charge_id": "ch_1001", "customer": "cus_ada", "merchant": "acme",
        "amount_cents": 450, "category": "coffee",
    });
    let hooked = payments
        .agent
        .hook("before_charge")
        .call("acme", charge.clone())
        .await
        .context("calling Acme's plug-in at before_charge")?;
    if hooked.output["discount_sent"] == true {
        let event = payments.agent.workflows().event_in_trace(
            "discount.sent",
            json!({
                "customer": charge["customer"], "merchant": "acme",
                "discount_percent": hooked.output["discount_percent"], "charge_id": charge["charge_id"],
            }),
            &hooked.trace,
        );
        payments
            .agent
            .workflows()
            .publish("acme", vec![event])
            .await?;
    }

    // Acme's agent runs its workflow for the delivered event.
    let mut acme_run = None;
    for _ in 0..200 {
        let runs = acme
            .agent
            .workflows()
            .runs(
                "default",
                RunFilter {
                    workflow: Some("satisfaction".into()),
                    ..RunFilter::default()
                },
            )
            .await?;
        if let Some(run) = runs.iter().find(|r| r.status.is_finished()) {
            acme_run = Some(acme.agent.workflows().run("default", &run.id).await?);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acme_run = acme_run.context("Acme's agent ran nothing within 10 s")?;
    let payments_run = payments
        .agent
        .workflows()
        .run("acme", &hooked.run_id)
        .await?;
    // Two more charges, and then Acme prepares a loyalty v2 (the same plug-in with a
    // threshold of 15) and replays it against the charges the platform recorded, on the
    // platform's agent: nothing happens again (no email, no lookup), and Acme sees whose
    // outcome would change.
    for (charge_id, customer) in [("ch_1002", "cus_bob"), ("ch_1003", "cus_cy")] {
        coffee(&payments, charge_id, customer).await?;
    }
    // Version 2 goes up beside version 1; an upload changes nothing that runs.
    call(
        http.post(format!("{}/v1/modules", payments.url))
            .bearer_auth(&acme_token)
            .query(&[("name", "acme-loyalty"), ("version", "2")])
            .body(ACME_LOYALTY_V2.to_vec()),
    )
    .await
    .context("Acme pushing loyalty v2")?;
    let mut loyalty_v2 = Value::Null;
    // Tapes are written in the background: until the three charges are there.
    for _ in 0..200 {
        loyalty_v2 = call(
            http.post(format!("{}/v1/modules/acme-loyalty@2/replay", payments.url))
                .bearer_auth(&acme_token)
                .query(&[("against", "acme-loyalty")]),
        )
        .await
        .context("Acme replaying loyalty v2")?;
        if loyalty_v2["total"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let emails_before_rollout = emails
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    // Satisfied with the replay, Acme rolls v2 out as a canary: it serves a share of
    // charges, and would be rolled back by itself if it failed more than v1.
    call(
        http.post(format!("{}/v1/modules/acme-loyalty/rollout", payments.url))
            .bearer_auth(&acme_token)
            .json(&json!({ "candidate": "2", "percent": CANARY_PERCENT })),
    )
    .await
    .context("Acme rolling loyalty v2 out")?;
    let mut canary_charges = Vec::new();
    for (number, customer) in [
        "cus_ada", "cus_bob", "cus_cy", "cus_ada", "cus_bob", "cus_ada",
    ]
    .into_iter()
    .enumerate()
    {
        let charge_id = format!("ch_{}", 1004 + number);
        let hooked = coffee(&payments, &charge_id, customer).await?;
        let run = payments
            .agent
            .workflows()
            .run("acme", &hooked.run_id)
            .await?;
        let step = run.steps.first().context("a hook run has its step")?;
        canary_charges.push(ServedCharge {
            charge_id,
            customer: customer.into(),
            version: step.version.clone(),
            canary: step.canary,
            discount_sent: hooked.output["discount_sent"] == true,
        });
    }
    let rollout = call(
        http.get(format!("{}/v1/modules/acme-loyalty/release", payments.url))
            .bearer_auth(&acme_token),
    )
    .await
    .context("reading loyalty's release")?;
    let mut acme_counters = serde_json::Map::new();
    for key in ["discounts:cus_ada", "discounts"] {
        // Counters are stored as decimal text, which reads as a JSON number.
        let value = call(own(http.get(format!("{}/v1/kv/{key}", acme.url)))).await?;
        acme_counters.insert(key.into(), value);
    }
    let report = Report {
        charge,
        hook_output: hooked.output,
        emails: emails_before_rollout,
        trace_id: hooked.trace.trace_id_hex(),
        payments_run,
        acme_run,
        acme_counters: Value::Object(acme_counters),
        loyalty_v2,
        rollout,
        canary_charges,
        consoles: vec![
            Console {
                agent: payments_identity.name.clone(),
                url: format!("{}/ui", payments.url),
                tenant: "acme".into(),
                token: acme_token,
                admin_token: payments.admin.clone(),
            },
            Console {
                agent: acme_identity.name.clone(),
                url: format!("{}/ui", acme.url),
                tenant: deadlift::DEFAULT_TENANT.into(),
                token: acme_own_token,
                admin_token: acme.admin.clone(),
            },
        ],
    };
    Ok(Story {
        report,
        agents: vec![payments, acme],
    })
}

/// A $3 coffee charge of Acme's customer: Acme's plug-in runs at `before_charge`.
async fn coffee(
    payments: &Running,
    charge_id: &str,
    customer: &str,
) -> anyhow::Result<deadlift::hooks::HookOutput> {
    payments
        .agent
        .hook("before_charge")
        .call(
            "acme",
            json!({
                "charge_id": charge_id, "customer": customer, "merchant": "acme",
                "amount_cents": 300, "category": "coffee",
            }),
        )
        .await
        .context("calling Acme's plug-in at before_charge")
}

fn print_run(side: &str, run: &Run) {
    println!(
        "  {side}: run {} of {} ({:?}), trace {}",
        run.summary.id, run.summary.workflow, run.summary.status, run.summary.trace_id
    );
    for step in &run.steps {
        let took = step.finished_unix_ms - step.started_unix_ms;
        println!(
            "    step {} {:?} in {took} ms: {} -> {}",
            step.id, step.status, step.input, step.output
        );
        for line in &step.logs {
            println!("      log {:?}: {}", line.level, line.message);
        }
    }
}

/// Prints the story as each side sees it, and where to see it in a browser.
pub fn print(report: &Report, serving: bool) {
    println!("== A charge at the payments platform");
    println!("  {}", report.charge);
    println!("== Acme's plug-in at before_charge (run on the platform's agent, next to its data)");
    println!("  {}", report.hook_output);
    println!("== Emails the platform sent for Acme");
    for email in &report.emails {
        println!("  to {}: {}\n    {}", email.to, email.subject, email.body);
    }
    println!(
        "== The runs, one trace across both agents ({})",
        report.trace_id
    );
    print_run("payments", &report.payments_run);
    print_run("acme    ", &report.acme_run);
    println!("== Acme's satisfaction counters (its own KV)");
    println!("  {}", report.acme_counters);
    println!(
        "== Acme tries loyalty v2 (threshold 15) on the {} charges the platform recorded (nothing is sent again)",
        report.loyalty_v2["total"]
    );
    for call in report.loyalty_v2["calls"].as_array().into_iter().flatten() {
        println!(
            "  {} ({}): {} (discount sent: {} -> {})",
            call["input"]["customer"].as_str().unwrap_or("?"),
            call["input"]["charge_id"].as_str().unwrap_or("?"),
            call["verdict"].as_str().unwrap_or("?"),
            call["recorded"]["output"]["discount_sent"],
            call["replayed"]["output"]["discount_sent"],
        );
    }
    println!(
        "== Acme rolls loyalty v2 out as a canary on {}% of charges (rolled back by itself if it fails more than v1)",
        report.rollout["rollout"]["percent"]
            .as_f64()
            .unwrap_or_default()
    );
    for charge in &report.canary_charges {
        println!(
            "  {} ({}): served by acme-loyalty@{}{}, discount sent: {}",
            charge.customer,
            charge.charge_id,
            charge.version.as_deref().unwrap_or("?"),
            if charge.canary { " (canary)" } else { "" },
            charge.discount_sent,
        );
    }
    if !serving {
        return;
    }
    println!("== Each agent's web console (Ctrl-C stops both agents)");
    for console in &report.consoles {
        println!(
            "  {}: {}  sign in as tenant `{}` with token {}",
            console.agent, console.url, console.tenant, console.token
        );
        println!(
            "  {}  the operator's admin token: {}",
            " ".repeat(console.agent.len()),
            console.admin_token
        );
    }
}
