//! The `/v1/hooks` routes: the extension points the embedding application declared, and
//! the caller's tenant binding one of its module functions to one of them.

use crate::Path;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, RawBody, parse_json};
use deadlift_agent::hooks::{Binding, HookError, HookInfo};

pub(super) fn routes() -> Router<AgentState> {
    Router::new()
        .route("/v1/hooks", get(list))
        .route("/v1/hooks/{name}/binding", put(bind).delete(unbind))
}

impl From<HookError> for ApiError {
    fn from(e: HookError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

#[utoipa::path(get, path = "/v1/hooks", tag = "hooks", security(("bearer" = [])),
    responses((status = 200, description = "Declared hooks with the tenant's bindings", body = Vec<HookInfo>)))]
pub(super) async fn list(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Json<Vec<HookInfo>>, ApiError> {
    let tenant = caller.tenant()?;
    Ok(Json(agent.hooks().list(&tenant).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BindRequest {
    /// Module reference: name, `name@version` or `sha256:...`.
    module: String,
    function: String,
}

#[utoipa::path(put, path = "/v1/hooks/{name}/binding", tag = "hooks", security(("bearer" = [])), params(("name" = String, Path, description = "The hook's name")),
    request_body = BindRequest,
    responses((status = 204, description = "Bound"),
        (status = 400, description = "The module does not fit the hook", body = ErrorBody),
        (status = 404, description = "No such hook", body = ErrorBody)))]
pub(super) async fn bind(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
    RawBody(body): RawBody,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.tenant()?;
    let request: BindRequest = parse_json(&body)?;
    agent
        .hooks()
        .bind(
            &tenant,
            Binding {
                hook: name.clone(),
                module: request.module,
                function: request.function,
                pinned: None,
                updated_unix_ms: 0,
            },
        )
        .await?;
    agent
        .changed(deadlift_agent::cluster::Setting::Binding { tenant, hook: name })
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/hooks/{name}/binding", tag = "hooks", security(("bearer" = [])), params(("name" = String, Path, description = "The hook's name")),
    responses((status = 204, description = "Unbound"), (status = 404, description = "Not bound", body = ErrorBody)))]
pub(super) async fn unbind(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.tenant()?;
    agent.hooks().unbind(&tenant, &name).await?;
    agent
        .changed(deadlift_agent::cluster::Setting::Binding { tenant, hook: name })
        .await;
    Ok(StatusCode::NO_CONTENT)
}
