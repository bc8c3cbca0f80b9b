//! Regression replay over HTTP: `POST /v1/modules/{candidate}/replay?against=NAME` runs
//! the tenant's recorded calls of module `NAME` (its tapes) through the candidate module,
//! every host call answered from its tape (nothing the host does happens again), and
//! reports per call and in total what changed (judged by the agent's `replay` module).

use axum::Json;
use axum::extract::State;
use deadlift_agent::replay::{Outcome, Recorded, shown};
use deadlift_agent::tapes::{StoredTape, TapeFilter};
use deadlift_engine::Grant;
use deadlift_engine::registry::ModuleInfo;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, Path, Query};

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
    /// Fuel and time of the calls that succeeded both when recorded and replayed,
    /// summed: the change in cost.
    totals: CostTotals,
    calls: Vec<ReplayedCall>,
}

/// Fuel and time summed over the calls that succeeded both times.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub(super) struct CostTotals {
    calls: usize,
    fuel_recorded: u64,
    fuel_replayed: u64,
    duration_us_recorded: u64,
    duration_us_replayed: u64,
}

/// Recorded calls one replay runs at once.
const REPLAYS_AT_ONCE: usize = 4;

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
        totals: CostTotals::default(),
        calls: Vec::new(),
    };
    // Oldest first, as the calls happened; a few at once (each is one of the tenant's
    // calls on the engine, in its fair share).
    let mut replayed = futures_util::stream::iter(tapes.into_iter().rev())
        .map(|stored| replay_one(&agent, &tenant, &module, &base, stored))
        .buffered(REPLAYS_AT_ONCE);
    while let Some(call) = replayed.next().await {
        match call.verdict {
            "identical" => report.identical += 1,
            "changed" => report.changed += 1,
            "newly_failing" => report.failed += 1,
            "no_longer_failing" => report.fixed += 1,
            "diverged" => report.diverged += 1,
            _ => {}
        }
        if matches!(call.verdict, "identical" | "changed") {
            let totals = &mut report.totals;
            totals.calls += 1;
            totals.fuel_recorded += call.fuel_recorded;
            totals.fuel_replayed += call.fuel_replayed;
            totals.duration_us_recorded += call.duration_us_recorded;
            totals.duration_us_replayed += call.duration_us_replayed;
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
    let recorded = match (&stored.output, &stored.error) {
        (_, Some(error)) => Err(error.clone()),
        (Some(output), None) => Ok(hex::decode(output).unwrap_or_default()),
        (None, None) => Ok(Vec::new()),
    };
    let recorded = Recorded {
        function: stored.function.clone(),
        input,
        host_calls: stored.host_calls,
        start: stored.start,
        outcome: recorded,
    };
    let replayed =
        deadlift_agent::replay::replay(agent.engine(), tenant, module, base, &recorded).await;
    ReplayedCall {
        tape: stored.id,
        function: stored.function,
        input: shown(&recorded.input),
        verdict: replayed.verdict.as_str(),
        recorded: replayed.recorded,
        replayed: replayed.replayed,
        diff: replayed.diff,
        fuel_recorded: stored.fuel_used,
        fuel_replayed: replayed.fuel_used,
        duration_us_recorded: stored.duration_us,
        duration_us_replayed: replayed.duration_us,
    }
}
