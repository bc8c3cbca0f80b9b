//! Regression replay over HTTP: `POST /v1/modules/{candidate}/replay?against=NAME` runs
//! the tenant's recorded calls of module `NAME` (its tapes) through the candidate module,
//! every host call answered from its tape (nothing the host does happens again), and
//! reports per call and in total what changed. Also where the direct call route records
//! its tapes.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use deadlift_agent::tapes::{Recording, StoredTape, TapeError, TapeFilter};
use deadlift_engine::registry::ModuleInfo;
use deadlift_engine::tape::Tape;
use deadlift_engine::{CallContext, CallError, CallOutput, Grant};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, Path, Query};

/// Records a direct call, when the tenant's calls are recorded.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_call(
    agent: &deadlift_agent::Agent,
    tenant: &str,
    module: (&deadlift_engine::ModuleId, Option<&str>),
    function: &str,
    input: &[u8],
    tape: Option<Tape>,
    called: &Result<CallOutput, CallError>,
    started: SystemTime,
) {
    let Some(tape) = tape else {
        return;
    };
    let (outcome, fuel_used) = match called {
        Ok(out) => (Ok(out.output.clone()), out.fuel_used),
        Err(error) => (Err(tape_error(error)), 0),
    };
    let recording = Recording {
        tenant: tenant.to_owned(),
        module_name: module.1.map(str::to_owned),
        module_id: module.0.to_string(),
        function: function.to_owned(),
        input: input.to_vec(),
        outcome,
        host_calls: tape.calls(),
        fuel_used,
        duration_us: u64::try_from(started.elapsed().unwrap_or_default().as_micros())
            .unwrap_or(u64::MAX),
    };
    agent.tapes().record(recording, &tape);
}

fn tape_error(error: &CallError) -> TapeError {
    TapeError {
        code: error.code().as_str().to_owned(),
        message: error.to_string(),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ReplayQuery {
    /// The module name whose recorded calls are replayed.
    against: String,
    /// Only calls of this function.
    function: Option<String>,
    /// The newest this many calls (default 100, at most 1,000).
    #[param(minimum = 1, maximum = 1000)]
    last: Option<u32>,
    /// Only calls recorded at or after this time (Unix ms).
    since: Option<i64>,
}

/// What the candidate runs with besides its own manifest.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayOptions {
    /// Config entries that replace the module's own for the replay (Extism config):
    /// a new version can be the same bytes configured otherwise.
    #[serde(default)]
    config: std::collections::BTreeMap<String, String>,
}

/// What a call gave: its output (JSON when it is JSON, else text, else hex) or its error.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub(super) struct Outcome {
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<TapeError>,
}

/// One recorded call, replayed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ReplayedCall {
    tape: i64,
    function: String,
    /// The recorded input (JSON when it is JSON, else text, else hex).
    input: Value,
    /// `identical`, `changed`, `newly_failing`, `no_longer_failing`, `still_failing` or
    /// `diverged` (the candidate made a host call the tape cannot answer).
    verdict: &'static str,
    recorded: Outcome,
    replayed: Outcome,
    /// For JSON outputs that changed: each path that differs, with both values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    diff: Vec<Value>,
    fuel_recorded: u64,
    fuel_replayed: u64,
    duration_us_recorded: u64,
    duration_us_replayed: u64,
}

/// The replay's report.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ReplayReport {
    against: String,
    candidate: String,
    total: usize,
    identical: usize,
    changed: usize,
    /// Calls that succeeded when recorded and fail now (divergences not included).
    failed: usize,
    /// Calls that failed when recorded and succeed now.
    fixed: usize,
    diverged: usize,
    calls: Vec<ReplayedCall>,
}

/// Replays the tenant's recorded calls of module `against` through module `candidate`.
#[utoipa::path(post, path = "/v1/modules/{reference}/replay", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "The candidate module: `name`, `name@version` or `sha256:<hex>`"), ReplayQuery),
    request_body(content = Option<ReplayOptions>, description = "Optional: config entries for the candidate"),
    responses((status = 200, description = "Every replayed call and the totals", body = ReplayReport),
        (status = 404, description = "No such module", body = ErrorBody)))]
pub(super) async fn replay_calls(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(candidate): Path<String>,
    Query(query): Query<ReplayQuery>,
    crate::RawBody(body): crate::RawBody,
) -> Result<Json<ReplayReport>, ApiError> {
    let tenant = caller.tenant()?;
    let options: ReplayOptions = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayOptions::default()
    } else {
        crate::parse_json(&body)?
    };
    let module = crate::api::resolve(&agent, tenant.clone(), candidate).await?;
    let tapes = agent
        .tapes()
        .list(
            &tenant,
            &query.against,
            TapeFilter {
                function: query.function.clone(),
                last: query.last,
                since_unix_ms: query.since,
            },
        )
        .await?;
    let mut base = agent.call_grant(&tenant, &module.id).await?;
    base.config.extend(options.config);
    let mut report = ReplayReport {
        against: query.against,
        candidate: module.id.to_string(),
        total: tapes.len(),
        identical: 0,
        changed: 0,
        failed: 0,
        fixed: 0,
        diverged: 0,
        calls: Vec::new(),
    };
    // Oldest first: as the calls happened.
    for stored in tapes.into_iter().rev() {
        let call = replay_one(&agent, &tenant, &module, &base, stored).await;
        match call.verdict {
            "identical" => report.identical += 1,
            "changed" => report.changed += 1,
            "newly_failing" => report.failed += 1,
            "no_longer_failing" => report.fixed += 1,
            "diverged" => report.diverged += 1,
            _ => {}
        }
        report.calls.push(call);
    }
    Ok(Json(report))
}

async fn replay_one(
    agent: &AgentState,
    tenant: &str,
    module: &ModuleInfo,
    base: &Grant,
    stored: StoredTape,
) -> ReplayedCall {
    let input = hex::decode(&stored.input).unwrap_or_default();
    // Every host call is answered from the tape or refused as a divergence, so the grant
    // may name every host function the candidate imports: none of them runs.
    let mut grant = base.clone();
    for import in &module.imports {
        if import.module == "extism:host/user" {
            grant.host_functions.insert(import.name.clone());
        }
    }
    if stored
        .host_calls
        .iter()
        .any(|c| c.function == "http_request")
    {
        grant.allowed_hosts.push("*".into());
    }
    let ctx = CallContext::new(tenant).with_tape(Tape::replaying(stored.host_calls.clone()));
    let replayed = agent
        .engine()
        .call(&module.id, &stored.function, &input, &grant, &ctx)
        .await;
    let recorded = Outcome {
        output: stored
            .output
            .as_deref()
            .map(|hex| shown(&hex::decode(hex).unwrap_or_default())),
        error: stored.error.clone(),
    };
    let (replayed_outcome, fuel, duration) = match &replayed {
        Ok(out) => (
            Outcome {
                output: Some(shown(&out.output)),
                error: None,
            },
            out.fuel_used,
            u64::try_from(out.duration.as_micros()).unwrap_or(u64::MAX),
        ),
        Err(error) => (
            Outcome {
                output: None,
                error: Some(tape_error(error)),
            },
            0,
            0,
        ),
    };
    let verdict = match (&replayed, recorded.error.is_some()) {
        (Err(CallError::Diverged { .. }), _) => "diverged",
        (Ok(_), false) if replayed_outcome == recorded => "identical",
        (Ok(_), false) => "changed",
        (Ok(_), true) => "no_longer_failing",
        (Err(_), false) => "newly_failing",
        (Err(_), true) => "still_failing",
    };
    let diff = match (&recorded.output, &replayed_outcome.output) {
        (Some(before), Some(after)) if verdict == "changed" => {
            let mut paths = Vec::new();
            json_diff("", before, after, &mut paths);
            paths
        }
        _ => Vec::new(),
    };
    ReplayedCall {
        tape: stored.id,
        function: stored.function,
        input: shown(&input),
        verdict,
        recorded,
        replayed: replayed_outcome,
        diff,
        fuel_recorded: stored.fuel_used,
        fuel_replayed: fuel,
        duration_us_recorded: stored.duration_us,
        duration_us_replayed: duration,
    }
}

/// Output bytes as a person reads them: JSON, else text, else hex.
fn shown(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => serde_json::json!({ "hex": hex::encode(bytes) }),
    })
}

/// Each JSON Pointer path where `after` differs from `before`, with both values.
fn json_diff(path: &str, before: &Value, after: &Value, out: &mut Vec<Value>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let here = format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"));
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => json_diff(&here, x, y, out),
                    (x, y) => {
                        out.push(serde_json::json!({"path": here, "recorded": x, "replayed": y}))
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (index, (x, y)) in a.iter().zip(b).enumerate() {
                json_diff(&format!("{path}/{index}"), x, y, out);
            }
        }
        (x, y) if x != y => {
            out.push(serde_json::json!({"path": if path.is_empty() { "/" } else { path }, "recorded": x, "replayed": y}));
        }
        _ => {}
    }
}
