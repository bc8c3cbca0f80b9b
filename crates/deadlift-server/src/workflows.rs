//! The `/v1` routes of workflows, events, runs and dead letters, for the caller's
//! tenant: apply and list workflow documents, publish CloudEvents, start and watch
//! runs (including a live Server-Sent Events stream), retry runs and replay dead letters.

use deadlift_agent::cluster::Setting;
use std::convert::Infallible;
use std::time::Duration;

use crate::{Path, Query, page_limit};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, RawBody, json};
use deadlift_agent::federation::TraceView;
use deadlift_agent::workflow::event::{BATCH_CONTENT_TYPE, parse_binary, parse_events};
use deadlift_agent::workflow::{
    DeadLetter, Ingested, Run, RunFilter, RunSummary, TraceParent, WorkflowError, WorkflowSpec,
    WorkflowVersion,
};
use deadlift_engine::Code;

/// Longest `?wait=true` a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

pub(super) fn routes() -> Router<AgentState> {
    Router::new()
        .route("/v1/workflows", get(list_workflows))
        .route(
            "/v1/workflows/{name}",
            get(get_workflow)
                .put(apply_workflow)
                .delete(delete_workflow),
        )
        .route("/v1/workflows/{name}/runs", post(start_run))
        .route("/v1/events", post(publish_events))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/live", get(live_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/retry", post(retry_run))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/dead-letters", get(list_dead_letters))
        .route("/v1/dead-letters/{id}/replay", post(replay_dead_letter))
        .route("/v1/traces/{trace_id}", get(get_trace))
}

/// Applies a workflow document: JSON, or TOML with a TOML content type.
#[utoipa::path(put, path = "/v1/workflows/{name}", tag = "workflows", security(("bearer" = [])), params(("name" = String, Path, description = "The workflow's name")),
    request_body(content = WorkflowSpec, description = "The workflow document (JSON; TOML with `Content-Type: application/toml`)"),
    responses((status = 200, description = "Stored as a new version", body = WorkflowVersion),
        (status = 400, description = "Invalid: `error.details.errors` lists each field and why", body = ErrorBody)))]
pub(super) async fn apply_workflow(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<WorkflowVersion>, ApiError> {
    let tenant = caller.tenant()?;
    let is_toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("toml"));
    let spec = if is_toml {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::new(Code::WorkflowInvalid, "the TOML document is not UTF-8"))?;
        WorkflowSpec::from_toml(text)
    } else {
        WorkflowSpec::from_json(&body)
    }
    .map_err(deadlift_agent::workflow::WorkflowError::from)?;
    let version = agent.workflows().apply(&tenant, spec, Some(&name)).await?;
    agent
        .changed(Setting::Workflow {
            tenant: tenant.clone(),
            name: name.clone(),
        })
        .await;
    Ok(Json(version))
}

#[utoipa::path(get, path = "/v1/workflows", tag = "workflows", security(("bearer" = [])),
    responses((status = 200, description = "The tenant's workflows, each at its current version", body = Vec<WorkflowVersion>)))]
pub(super) async fn list_workflows(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Json<Vec<WorkflowVersion>>, ApiError> {
    let tenant = caller.tenant()?;
    Ok(Json(agent.workflows().workflows(&tenant).await?))
}

#[utoipa::path(get, path = "/v1/workflows/{name}", tag = "workflows", security(("bearer" = [])), params(("name" = String, Path, description = "The workflow's name")),
    responses((status = 200, description = "The workflow's current version", body = WorkflowVersion),
        (status = 404, description = "No such workflow", body = ErrorBody)))]
pub(super) async fn get_workflow(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<WorkflowVersion>, ApiError> {
    let tenant = caller.tenant()?;
    Ok(Json(agent.workflows().workflow(&tenant, &name).await?))
}

#[utoipa::path(delete, path = "/v1/workflows/{name}", tag = "workflows", security(("bearer" = [])), params(("name" = String, Path, description = "The workflow's name")),
    responses((status = 204, description = "Deleted; its runs and versions stay in the history"),
        (status = 404, description = "No such workflow", body = ErrorBody)))]
pub(super) async fn delete_workflow(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.tenant()?;
    agent.workflows().delete(&tenant, &name).await?;
    agent
        .changed(Setting::Workflow {
            tenant: tenant.clone(),
            name: name.clone(),
        })
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct StartQuery {
    /// Answer when the run has finished (up to `timeout_ms`), with the run.
    #[serde(default)]
    wait: bool,
    /// How long to wait (default 30 000, at most 60 000).
    timeout_ms: Option<u64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct StartedRun {
    run_id: String,
}

/// Starts a run over HTTP; the body (JSON, may be empty for null) is its input.
#[utoipa::path(post, path = "/v1/workflows/{name}/runs", tag = "runs", security(("bearer" = [])), params(("name" = String, Path, description = "The workflow's name"), StartQuery),
    request_body(content = Object, description = "The run's input"),
    responses((status = 202, description = "Queued (or, with wait, not finished in time)", body = StartedRun),
        (status = 200, description = "With wait: the finished run", body = Run),
        (status = 404, description = "No such workflow", body = ErrorBody)))]
pub(super) async fn start_run(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<StartQuery>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let input: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        crate::parse_value(&body)?
    };
    let trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let runtime = agent.workflows();
    let run_id = runtime.start_run(&tenant, &name, input, trace).await?;
    if query.wait {
        let timeout = Duration::from_millis(query.timeout_ms.unwrap_or(30_000)).min(MAX_WAIT);
        if runtime.wait(&run_id, timeout).await.is_some() {
            return Ok(json(StatusCode::OK, runtime.run(&tenant, &run_id).await?));
        }
    }
    Ok(json(StatusCode::ACCEPTED, StartedRun { run_id }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Published {
    /// The ids of the events, in order, all committed.
    ids: Vec<String>,
    events: Vec<Ingested>,
}

/// Publishes CloudEvents (structured mode, or a batch); answers once they are durable.
#[utoipa::path(post, path = "/v1/events", tag = "events", security(("bearer" = [])),
    request_body(content = deadlift_agent::workflow::CloudEvent, content_type = "application/cloudevents+json", description = "One CloudEvent, or an array with `application/cloudevents-batch+json`"),
    responses((status = 202, description = "Committed; the runs they started are queued", body = Published),
        (status = 400, description = "Not valid CloudEvents", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody)))]
pub(super) async fn publish_events(
    State(agent): State<AgentState>,
    caller: Caller,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    // Binary mode: the attributes in `ce-*` headers, the data in the body.
    let binary = headers.contains_key("ce-specversion")
        && !essence.eq_ignore_ascii_case("application/cloudevents+json")
        && !essence.eq_ignore_ascii_case(BATCH_CONTENT_TYPE);
    let mut events = if binary {
        let attributes = headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        vec![parse_binary(attributes, content_type, &body).map_err(WorkflowError::from)?]
    } else {
        parse_events(content_type, &body).map_err(WorkflowError::from)?
    };
    // The request's own trace context (W3C `traceparent` header) is the trace of the
    // events that carry none.
    if let Some(traceparent) = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|text| TraceParent::parse(text).is_some())
    {
        for event in &mut events {
            event
                .extensions
                .entry("traceparent".to_owned())
                .or_insert_with(|| serde_json::Value::String(traceparent.to_owned()));
        }
    }
    // In a cluster, the cluster's stream takes the events (once acknowledged there,
    // whichever agent pulls one journals it); alone, this agent's journal.
    let ingested = match agent.cluster() {
        Some(cluster) => cluster.publish(&tenant, events).await?,
        None => agent.workflows().publish(&tenant, events).await?,
    };
    Ok(json(
        StatusCode::ACCEPTED,
        Published {
            ids: ingested.iter().map(|i| i.id.clone()).collect(),
            events: ingested,
        },
    ))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct RunPage {
    runs: Vec<RunSummary>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<i64>,
}

#[utoipa::path(get, path = "/v1/runs", tag = "runs", security(("bearer" = [])), params(RunFilter),
    responses((status = 200, description = "Runs, newest first", body = RunPage)))]
pub(super) async fn list_runs(
    State(agent): State<AgentState>,
    caller: Caller,
    Query(filter): Query<RunFilter>,
) -> Result<Json<RunPage>, ApiError> {
    let tenant = caller.tenant()?;
    let limit = page_limit(filter.limit, 50)? as usize;
    let runs = agent.workflows().runs(&tenant, filter).await?;
    let next = (runs.len() == limit)
        .then(|| runs.last().map(|r| r.seq))
        .flatten();
    Ok(Json(RunPage { runs, next }))
}

#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs", security(("bearer" = [])), params(("id" = String, Path, description = "The run's id")),
    responses((status = 200, description = "The run with every journaled step", body = Run),
        (status = 404, description = "No such run", body = ErrorBody)))]
pub(super) async fn get_run(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    let tenant = caller.tenant()?;
    Ok(Json(agent.workflows().run(&tenant, &id).await?))
}

#[utoipa::path(post, path = "/v1/runs/{id}/retry", tag = "runs", security(("bearer" = [])), params(("id" = String, Path, description = "The run's id")),
    responses((status = 202, description = "Queued again from its failed step", body = StartedRun),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run is not failed or cancelled", body = ErrorBody)))]
pub(super) async fn retry_run(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    agent.workflows().retry(&tenant, &id).await?;
    Ok(json(StatusCode::ACCEPTED, StartedRun { run_id: id }))
}

#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "runs", security(("bearer" = [])), params(("id" = String, Path, description = "The run's id")),
    responses((status = 202, description = "Cancelled", body = StartedRun),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has already finished", body = ErrorBody)))]
pub(super) async fn cancel_run(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    agent.workflows().cancel(&tenant, &id).await?;
    Ok(json(StatusCode::ACCEPTED, StartedRun { run_id: id }))
}

/// Run updates as Server-Sent Events (`event: run`, data: a run summary), live.
#[utoipa::path(get, path = "/v1/runs/live", tag = "runs", security(("bearer" = [])),
    responses((status = 200, description = "text/event-stream of run summaries as they change", content_type = "text/event-stream")))]
pub(super) async fn live_runs(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let tenant = caller.tenant()?;
    let (updates, closing) = agent.workflows().subscribe();
    let stream = async_stream(updates, closing, tenant);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Turns the broadcast of run updates into this tenant's SSE events.
fn async_stream(
    updates: tokio::sync::broadcast::Receiver<deadlift_agent::workflow::RunUpdate>,
    closing: tokio::sync::watch::Receiver<bool>,
    tenant: String,
) -> impl futures_util::Stream<Item = Result<SseEvent, Infallible>> {
    use tokio::sync::broadcast::error::RecvError;
    let state = (updates, closing, tenant);
    futures_util::stream::unfold(state, |(mut updates, mut closing, tenant)| async move {
        loop {
            if *closing.borrow() {
                return None;
            }
            let update = tokio::select! {
                update = updates.recv() => update,
                _ = closing.changed() => return None,
            };
            match update {
                Ok(update) if update.tenant == tenant => {
                    let event = SseEvent::default()
                        .event("run")
                        .json_data(&update.run)
                        .unwrap_or_else(|_| SseEvent::default().comment("unencodable update"));
                    return Some((Ok(event), (updates, closing, tenant)));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    let event = SseEvent::default().event("lagged").data(missed.to_string());
                    return Some((Ok(event), (updates, closing, tenant)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DeadLetterQuery {
    /// Also list dead letters already replayed.
    #[serde(default)]
    include_replayed: bool,
    /// At most this many (default 100, at most 500).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/dead-letters", tag = "runs", security(("bearer" = [])), params(DeadLetterQuery),
    responses((status = 200, description = "Failed runs waiting for attention, newest first", body = Vec<DeadLetter>)))]
pub(super) async fn list_dead_letters(
    State(agent): State<AgentState>,
    caller: Caller,
    Query(query): Query<DeadLetterQuery>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let tenant = caller.tenant()?;
    Ok(Json(
        agent
            .workflows()
            .dead_letters(
                &tenant,
                query.include_replayed,
                page_limit(query.limit, 100)?,
            )
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/dead-letters/{id}/replay", tag = "runs", security(("bearer" = [])), params(("id" = i64, Path, description = "The dead letter's id")),
    responses((status = 202, description = "Its run is queued again from the failed step", body = StartedRun),
        (status = 404, description = "No such dead letter", body = ErrorBody),
        (status = 409, description = "Already replayed and not failed again", body = ErrorBody)))]
pub(super) async fn replay_dead_letter(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let run_id = agent.workflows().replay(&tenant, id).await?;
    Ok(json(StatusCode::ACCEPTED, StartedRun { run_id }))
}

/// Most runs of one trace answered from this agent.
const MAX_TRACE_RUNS: u32 = 100;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct TraceQuery {
    /// Also ask each peer the tenant holds a view token for (default true); peers are
    /// asked with `false`, so that two agents never ask each other in circles.
    peers: Option<bool>,
}

/// A trace: this agent's runs of it for the tenant, with every step, and each viewable
/// peer's side of it (`/v1/peer-views`).
#[utoipa::path(get, path = "/v1/traces/{trace_id}", tag = "runs", security(("bearer" = [])),
    params(("trace_id" = String, Path, description = "32 lowercase hex digits, not all zero", pattern = "^[0-9a-f]*[1-9a-f][0-9a-f]*$", min_length = 32, max_length = 32), TraceQuery),
    responses((status = 200, description = "The trace's runs here and on the tenant's viewable peers", body = TraceView),
        (status = 400, description = "Not a trace id", body = ErrorBody)))]
pub(super) async fn get_trace(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(trace_id): Path<String>,
    Query(query): Query<TraceQuery>,
) -> Result<Json<TraceView>, ApiError> {
    let tenant = caller.tenant()?;
    let valid = trace_id.len() == 32
        && trace_id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && trace_id.bytes().any(|b| b != b'0');
    if !valid {
        return Err(ApiError::new(
            Code::BadRequest,
            "a trace id is 32 lowercase hex digits, not all zero",
        ));
    }
    let filter = RunFilter {
        trace_id: Some(trace_id.clone()),
        limit: Some(MAX_TRACE_RUNS),
        ..RunFilter::default()
    };
    let peers = async {
        if query.peers.unwrap_or(true) {
            agent.federation().peer_traces(&tenant, &trace_id).await
        } else {
            Ok(Vec::new())
        }
    };
    let (summaries, peers) = tokio::join!(agent.workflows().runs(&tenant, filter), peers);
    let mut runs = Vec::new();
    // Oldest first: a trace reads in the order it happened.
    for summary in summaries?.iter().rev() {
        match agent.workflows().run(&tenant, &summary.id).await {
            Ok(run) => runs.push(run),
            // Deleted by retention between the two reads.
            Err(WorkflowError::RunNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(TraceView {
        trace_id,
        agent: agent.federation().identity().name.clone(),
        runs,
        peers: peers?,
    }))
}
