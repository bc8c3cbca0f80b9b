//! The release routes of a module name: which version serves it
//! (`GET /v1/modules/{name}/release`), a rollout of another version beside it as a canary
//! or in shadow (`POST …/rollout`), and promoting or rolling back by hand
//! (`POST …/promote`, `POST …/rollback`). The agent's `releases` module does the work.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use deadlift_agent::releases::{ReleaseError, ReleaseStatus, RolloutSpec};
use serde::Deserialize;

use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, Path, RawBody, parse_json};

pub(super) fn routes() -> Router<AgentState> {
    Router::new()
        .route("/v1/modules/{reference}/release", get(get_release))
        .route("/v1/modules/{reference}/rollout", post(start_rollout))
        .route("/v1/modules/{reference}/promote", post(promote))
        .route("/v1/modules/{reference}/rollback", post(rollback))
}

impl From<ReleaseError> for ApiError {
    fn from(e: ReleaseError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

#[utoipa::path(get, path = "/v1/modules/{reference}/release", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "The module name")),
    responses((status = 200, description = "The live version, the rollout in progress with its counts, and the history", body = ReleaseStatus),
        (status = 404, description = "No module has this name", body = ErrorBody)))]
pub(super) async fn get_release(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ReleaseStatus>, ApiError> {
    let tenant = caller.tenant()?;
    Ok(Json(agent.releases().status(&tenant, &name).await?))
}

#[utoipa::path(post, path = "/v1/modules/{reference}/rollout", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "The module name")),
    request_body = RolloutSpec,
    responses((status = 200, description = "The rollout started", body = ReleaseStatus),
        (status = 404, description = "No such name or candidate", body = ErrorBody),
        (status = 409, description = "A rollout is in progress, the candidate is live already, or it lacks what a workflow or hook using the name needs", body = ErrorBody)))]
pub(super) async fn start_rollout(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<ReleaseStatus>, ApiError> {
    let tenant = caller.tenant()?;
    let spec: RolloutSpec = parse_json(&body)?;
    let uses = agent.name_uses(&tenant, &name).await?;
    let status = agent
        .releases()
        .start_rollout(&tenant, &name, spec, uses)
        .await?;
    shared(&agent, tenant, name).await;
    Ok(Json(status))
}

/// Which version to promote; without one, the rollout's candidate.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PromoteRequest {
    /// A version of the name (`2`), `name@version` or `sha256:<hex>`.
    version: Option<String>,
}

#[utoipa::path(post, path = "/v1/modules/{reference}/promote", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "The module name")),
    request_body(content = Option<PromoteRequest>, description = "Optional: the version to make live"),
    responses((status = 200, description = "The version is live; any rollout ended", body = ReleaseStatus),
        (status = 404, description = "No such name or version", body = ErrorBody),
        (status = 409, description = "Nothing to promote, the version is live already, or it lacks what a workflow or hook using the name needs", body = ErrorBody)))]
pub(super) async fn promote(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<ReleaseStatus>, ApiError> {
    let tenant = caller.tenant()?;
    let request: PromoteRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PromoteRequest::default()
    } else {
        parse_json(&body)?
    };
    let uses = agent.name_uses(&tenant, &name).await?;
    let status = agent
        .releases()
        .promote(&tenant, &name, request.version, uses)
        .await?;
    shared(&agent, tenant, name).await;
    Ok(Json(status))
}

#[utoipa::path(post, path = "/v1/modules/{reference}/rollback", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "The module name")),
    responses((status = 200, description = "The rollout ended, or the version live before the last promotion is live again", body = ReleaseStatus),
        (status = 404, description = "No module has this name", body = ErrorBody),
        (status = 409, description = "No rollout and no earlier version to go back to", body = ErrorBody)))]
pub(super) async fn rollback(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ReleaseStatus>, ApiError> {
    let tenant = caller.tenant()?;
    let uses = agent.name_uses(&tenant, &name).await?;
    let status = agent.releases().rollback(&tenant, &name, uses).await?;
    shared(&agent, tenant, name).await;
    Ok(Json(status))
}

/// In a cluster, the other agents get the release too.
async fn shared(agent: &AgentState, tenant: String, name: String) {
    agent
        .changed(deadlift_agent::cluster::Setting::Release { tenant, name })
        .await;
}
