//! The operator's policy over HTTP (admin only): read it, and replace it while the agent
//! runs. A replaced policy holds from the next call on, for runs already applied too; it
//! lasts until the agent restarts, when the configuration's policy applies again.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use deadlift_engine::Code;

use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, RawBody, parse_json};
use deadlift_agent::policy::Policy;

pub(super) fn routes() -> Router<AgentState> {
    Router::new().route("/v1/policy", get(get_policy).put(put_policy))
}

#[utoipa::path(get, path = "/v1/policy", tag = "policy", security(("bearer" = [])),
    responses((status = 200, description = "The policy in force (admin)", body = Policy),
        (status = 403, description = "Not an admin", body = ErrorBody)))]
pub(super) async fn get_policy(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Json<Policy>, ApiError> {
    caller.require_admin()?;
    Ok(Json((*agent.policy().current()).clone()))
}

#[utoipa::path(put, path = "/v1/policy", tag = "policy", security(("bearer" = [])),
    request_body = Policy,
    responses((status = 200, description = "In force from the next call on", body = Policy),
        (status = 400, description = "Not a policy", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody)))]
pub(super) async fn put_policy(
    State(agent): State<AgentState>,
    caller: Caller,
    RawBody(body): RawBody,
) -> Result<Json<Policy>, ApiError> {
    caller.require_admin()?;
    let policy: Policy = parse_json(&body)?;
    policy
        .validate()
        .map_err(|message| ApiError::new(Code::InvalidInput, message))?;
    agent.policy().replace(policy.clone());
    agent
        .changed(deadlift_agent::cluster::Setting::Policy)
        .await;
    Ok(Json(policy))
}
