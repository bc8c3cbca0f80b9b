//! The HTTP server: the JSON API under `/v1` (`api` for modules, tenants, tokens and
//! KV; `workflows` for workflows, events and runs), the original Deadlift v1 routes
//! (`v1`), health, readiness and Prometheus metrics, and the web console (`ui`). Only this
//! crate serves HTTP.
//!
//! [`serve`] takes its listener and shutdown signal from the caller, so tests bind
//! port 0 and stop the server when they like.

#![forbid(unsafe_code)]

mod api;
pub mod error;
mod hooks;
mod peers;
mod policy;
mod releases;
mod replay;
mod tenants;
mod ui;
mod v1;
mod workflows;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;

use deadlift_agent::agent::Agent;
use deadlift_agent::store::Principal;
use deadlift_engine::Code;
use deadlift_engine::engine::DURATION_BUCKETS_US;
pub use error::ApiError;

type AgentState = Arc<Agent>;

/// Where the server listens, as far as access rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    /// Only loopback addresses can reach the server.
    pub loopback: bool,
}

/// The whole router of an agent, as if it listened beyond loopback (the stricter rules).
pub fn router(agent: Arc<Agent>) -> Router {
    router_listening(agent, Listening { loopback: false })
}

/// The whole router of an agent that listens as `listening` says.
pub fn router_listening(agent: Arc<Agent>, listening: Listening) -> Router {
    let limit = agent.max_body_bytes();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api::routes())
        .merge(v1::routes())
        .merge(workflows::routes())
        .merge(peers::routes())
        .merge(hooks::routes())
        .merge(releases::routes())
        .merge(policy::routes())
        .merge(tenants::routes())
        .merge(ui::routes())
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(listening))
        .with_state(agent)
}

/// Serves the agent on `listener` until `shutdown` completes, then stops accepting
/// connections and lets in-flight requests finish.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let closing = agent.clone();
    let shutdown = async move {
        shutdown.await;
        // Live streams never end by themselves; graceful shutdown waits for them.
        closing.workflows().close_streams();
    };
    let listening = Listening {
        loopback: listener.local_addr()?.ip().is_loopback(),
    };
    axum::serve(listener, router_listening(agent, listening))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn route_not_found() -> ApiError {
    ApiError::new(Code::RouteNotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        Code::MethodNotAllowed,
        "this route does not accept that method",
    )
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 204, description = "The process is up")))]
pub(crate) async fn healthz() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Ready when the database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 204, description = "The database answers"), (status = 500, description = "It does not", body = error::ErrorBody)))]
pub(crate) async fn readyz(State(agent): State<AgentState>) -> Result<StatusCode, ApiError> {
    tokio::task::spawn_blocking(move || agent.db().schema_version()).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Prometheus text exposition of the engine's counters.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Counters, gauges and histograms in the Prometheus text format", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(State(agent): State<AgentState>) -> Response {
    use std::fmt::Write;
    let stats = agent.engine().stats();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    counter(
        "deadlift_calls_total",
        "Plug-in calls made.",
        "counter",
        stats.calls,
    );
    counter(
        "deadlift_call_errors_total",
        "Plug-in calls that failed.",
        "counter",
        stats.call_errors,
    );
    counter(
        "deadlift_modules_compiled_total",
        "Modules compiled from Wasm.",
        "counter",
        stats.compiled,
    );
    counter(
        "deadlift_modules_loaded_from_cache_total",
        "Modules loaded from the compiled cache.",
        "counter",
        stats.loaded_from_cache,
    );
    counter(
        "deadlift_instances_created_total",
        "Instances created.",
        "counter",
        stats.instances_created,
    );
    counter(
        "deadlift_instances_discarded_total",
        "Instances discarded after a trap or limit.",
        "counter",
        stats.instances_discarded,
    );
    counter(
        "deadlift_code_bytes",
        "Compiled code held in memory (reckoned bytes).",
        "gauge",
        stats.code_bytes,
    );
    counter(
        "deadlift_code_modules",
        "Modules whose compiled code is in memory.",
        "gauge",
        stats.code_modules,
    );
    counter(
        "deadlift_code_evicted_total",
        "Compiled modules dropped from memory to stay under the code cache's budget.",
        "counter",
        stats.code_evicted,
    );
    counter(
        "deadlift_calls_shed_total",
        "Calls not run because their tenant had too many waiting or waited too long.",
        "counter",
        stats.calls_shed,
    );
    for (name, help, value) in agent.workflows().stats().counters() {
        counter(name, help, "counter", value);
    }
    // Backlogs: what waits. An event is routed in the transaction that stores it, so
    // events awaiting routing are the journal writer's waiting writes.
    counter(
        "deadlift_journal_writes_waiting",
        "Writes (events to store and route, step records, run changes) waiting for the journal's writer.",
        "gauge",
        agent
            .workflows()
            .stats()
            .writes_waiting
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let (queued, running) = agent
        .workflows()
        .journal()
        .open_runs()
        .await
        .unwrap_or_default();
    counter(
        "deadlift_runs_queued",
        "Runs waiting to start.",
        "gauge",
        queued,
    );
    counter("deadlift_runs_running", "Runs under way.", "gauge", running);
    let pending = agent
        .federation()
        .outbox_pending()
        .await
        .unwrap_or_default();
    counter(
        "deadlift_outbox_pending",
        "Deliveries to peers waiting to be sent.",
        "gauge",
        pending,
    );
    counter(
        "deadlift_tapes_dropped_total",
        "Recorded calls not stored: over the size cap, or the writer behind.",
        "counter",
        agent.tapes().dropped(),
    );
    if let Some(telemetry) = agent.telemetry() {
        let stats = telemetry.stats();
        counter(
            "deadlift_spans_exported_total",
            "OpenTelemetry spans the collector accepted.",
            "counter",
            stats
                .spans_exported
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        counter(
            "deadlift_spans_dropped_total",
            "OpenTelemetry spans lost: the collector refused or was unreachable, or the exporter was behind.",
            "counter",
            stats
                .spans_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    counter(
        "deadlift_idle_instances",
        "Warm instances in pools.",
        "gauge",
        stats.idle_instances,
    );
    let _ = writeln!(
        out,
        "# HELP deadlift_call_errors_by_code_total Failed calls by error code.\n# TYPE deadlift_call_errors_by_code_total counter"
    );
    for (code, n) in &stats.errors_by_code {
        let _ = writeln!(
            out,
            "deadlift_call_errors_by_code_total{{code=\"{code}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP deadlift_call_duration_seconds Duration of plug-in calls.\n# TYPE deadlift_call_duration_seconds histogram"
    );
    let mut cumulative = 0;
    for (bound, n) in DURATION_BUCKETS_US.iter().zip(&stats.duration_buckets) {
        cumulative += n;
        let le = *bound as f64 / 1e6;
        let _ = writeln!(
            out,
            "deadlift_call_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let total: u64 = stats.duration_buckets.iter().sum();
    let _ = writeln!(
        out,
        "deadlift_call_duration_seconds_bucket{{le=\"+Inf\"}} {total}"
    );
    let _ = writeln!(
        out,
        "deadlift_call_duration_seconds_sum {}\ndeadlift_call_duration_seconds_count {total}",
        stats.duration_sum_us as f64 / 1e6
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Who is calling, from `Authorization: Bearer <token>`, and for which tenant: a tenant
/// token's own, or, for the admin, an existing tenant named in `X-Deadlift-Tenant`.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub principal: Principal,
    acting_for: Option<String>,
}

fn bearer(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::new(Code::Unauthorized, "the Authorization header is not text"))?;
    match text.strip_prefix("Bearer ") {
        Some(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_owned())),
        _ => Err(ApiError::new(
            Code::Unauthorized,
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

pub(crate) async fn authenticate(
    agent: &AgentState,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let Some(token) = bearer(headers)? else {
        return Err(ApiError::new(
            Code::Unauthorized,
            "this route needs a token: `Authorization: Bearer <token>`",
        ));
    };
    let named = headers
        .get("x-deadlift-tenant")
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::new(Code::TenantInvalid, "X-Deadlift-Tenant is not text"))
        })
        .transpose()?;
    let db = agent.db().clone();
    // Known tokens and tenants are answered from memory, without a blocking query.
    if let Some(principal) = db.cached_principal(&token) {
        let acting_for = match &principal {
            Principal::Tenant(tenant) => Some(Some(tenant.clone())),
            Principal::Admin => match &named {
                Some(tenant) if db.cached_tenant(tenant) => Some(named.clone()),
                Some(_) => None,
                None => Some(None),
            },
        };
        if let Some(acting_for) = acting_for {
            return Ok(Caller {
                principal,
                acting_for,
            });
        }
    }
    tokio::task::spawn_blocking(move || {
        let principal = db
            .authenticate(&token)?
            .ok_or_else(|| ApiError::new(Code::Unauthorized, "the token is not valid"))?;
        let acting_for = match &principal {
            Principal::Tenant(tenant) => Some(tenant.clone()),
            Principal::Admin => match named {
                Some(tenant) if !db.tenant_exists(&tenant)? => {
                    return Err(ApiError::new(
                        Code::TenantNotFound,
                        "the tenant named in X-Deadlift-Tenant does not exist",
                    ));
                }
                named => named,
            },
        };
        Ok(Caller {
            principal,
            acting_for,
        })
    })
    .await?
}

impl FromRequestParts<AgentState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        agent: &AgentState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(agent, &parts.headers).await
    }
}

impl Caller {
    /// The tenant this request acts for.
    pub(crate) fn tenant(&self) -> Result<String, ApiError> {
        self.acting_for.clone().ok_or_else(|| {
            ApiError::new(
                Code::Forbidden,
                "an admin token acts on a tenant's data only with an X-Deadlift-Tenant header",
            )
            // Lets a client name its own way of giving the tenant (the CLI's `--tenant`).
            .with_details(serde_json::json!({ "needs": "tenant" }))
        })
    }

    pub(crate) fn require_admin(&self) -> Result<(), ApiError> {
        match self.principal {
            Principal::Admin => Ok(()),
            Principal::Tenant(_) => Err(ApiError::new(
                Code::Forbidden,
                "this route needs an admin token",
            )),
        }
    }
}

/// The request body as bytes, with over-limit and unreadable bodies as JSON errors.
pub(crate) struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        Code::PayloadTooLarge,
                        "the request body is over the size limit",
                    )
                } else {
                    ApiError::new(Code::BadRequest, rejection.body_text())
                }
            })
    }
}

/// A multipart body that cannot be read: over the size limit, or malformed.
pub(crate) fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(Code::PayloadTooLarge, "the upload is over the size limit")
    } else {
        ApiError::new(
            Code::BadRequest,
            format!("unreadable multipart body: {}", e.body_text()),
        )
    }
}

/// Parses a JSON body, answering `invalid_json` with the parser's reason.
pub(crate) fn parse_value(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            Code::InvalidJson,
            format!("the body is not valid JSON: {e}"),
        )
    })
}

/// Parses a JSON settings document (a manifest, a policy, a peer...) into its type.
/// JSON has one number type, and JSON Schema counts `5.0` as an integer: a client that
/// writes a count as `5.0` means 5, so integral numbers are read as integers.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut value = parse_value(bytes)?;
    integral_floats_as_integers(&mut value);
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            Code::InvalidJson,
            format!("the body is not valid JSON: {e}"),
        )
    })
}

fn integral_floats_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(number) if number.is_f64() => {
            let float = number.as_f64().unwrap_or(f64::NAN);
            // Exactly integral and within 2^53, where every integer is a float.
            if float.fract() == 0.0 && float.abs() <= 9_007_199_254_740_992.0 {
                #[allow(clippy::cast_possible_truncation)]
                let integer = float as i64;
                *value = Value::from(integer);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(members) => members.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

pub(crate) fn json<T: serde::Serialize>(status: StatusCode, value: T) -> Response {
    (status, Json(value)).into_response()
}

/// `axum::extract::Path` answering a bad segment (`/v1/outbox/abc/replay`) with the
/// JSON error shape, not axum's plain text.
pub(crate) struct Path<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection| {
                ApiError::new(
                    Code::BadRequest,
                    format!("bad path: {}", rejection.body_text()),
                )
            })
    }
}

/// `axum::extract::Query`, likewise answering bad parameters with the JSON error shape.
pub(crate) struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection| {
                ApiError::new(
                    Code::BadRequest,
                    format!("bad query: {}", rejection.body_text()),
                )
            })
    }
}

/// A list's `limit`: the default when absent; 1 to 500, or a 400 naming the bounds.
pub(crate) fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(default),
        Some(limit @ 1..=500) => Ok(limit),
        Some(other) => Err(ApiError::new(
            Code::BadRequest,
            format!("limit must be 1 to 500, not {other}"),
        )),
    }
}
