//! Tenants and tokens over HTTP (the admin's), and `/v1/whoami` (anyone's): who a token
//! is, for the console.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use deadlift_agent::cluster::Setting;
use serde::{Deserialize, Serialize};

use crate::api::blocking;
use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, Path, RawBody, json, parse_json};
use deadlift_agent::agent::new_token;
use deadlift_agent::store::{Principal, TokenInfo};
use deadlift_engine::Code;

pub(super) fn routes() -> Router<AgentState> {
    Router::new()
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{tenant}/tokens", post(create_token))
        .route("/v1/tokens", get(list_tokens))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/whoami", get(whoami))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewTenant {
    /// 1 to 64 characters of a-z, 0-9, `-` or `_`.
    #[schema(pattern = "^[a-z0-9_-]{1,64}$")]
    name: String,
}

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", security(("bearer" = [])), request_body = NewTenant,
    responses((status = 201, description = "Created"), (status = 400, description = "Invalid name or body", body = ErrorBody),
        (status = 409, description = "Exists", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(super) async fn create_tenant(
    State(agent): State<AgentState>,
    caller: Caller,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let NewTenant { name } = parse_json(&body)?;
    if let Err(reason) = deadlift_engine::names::tenant_name(&name) {
        return Err(ApiError::new(
            Code::TenantInvalid,
            format!("a tenant name {reason}"),
        ));
    }
    let db = agent.db().clone();
    let created_name = name.clone();
    let created = blocking(move || Ok(db.create_tenant(&created_name)?)).await?;
    if !created {
        return Err(ApiError::new(
            Code::TenantExists,
            format!("tenant `{name}` already exists"),
        ));
    }
    agent.changed(Setting::Tenant(name.clone())).await;
    Ok(json(
        StatusCode::CREATED,
        serde_json::json!({ "name": name }),
    ))
}

#[utoipa::path(get, path = "/v1/tenants", tag = "tenants", security(("bearer" = [])),
    responses((status = 200, description = "Every tenant's name"), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(super) async fn list_tenants(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let db = agent.db().clone();
    let tenants = blocking(move || Ok(db.tenants()?)).await?;
    Ok(Json(serde_json::json!({ "tenants": tenants })).into_response())
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    description: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct CreatedToken {
    /// The secret: shown once, stored only as a hash.
    token: String,
    #[serde(flatten)]
    info: TokenInfo,
}

#[utoipa::path(post, path = "/v1/tenants/{tenant}/tokens", tag = "tenants", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "The tenant the token acts for")), request_body(content = Option<NewToken>, description = "Optional: a label for the token"),
    responses((status = 201, description = "The new token; its secret is shown only now", body = CreatedToken),
        (status = 404, description = "No such tenant", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(super) async fn create_token(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(tenant): Path<String>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let request: NewToken = if body.is_empty() {
        NewToken::default()
    } else {
        parse_json(&body)?
    };
    let db = agent.db().clone();
    let created = blocking(move || {
        if !db.tenant_exists(&tenant)? {
            return Err(ApiError::new(
                Code::TenantNotFound,
                format!("no tenant `{tenant}`"),
            ));
        }
        let token = new_token().map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
        let info = db.add_token(
            &token,
            &Principal::Tenant(tenant),
            request.description.as_deref(),
        )?;
        Ok(CreatedToken { token, info })
    })
    .await?;
    agent.changed(Setting::Token(created.info.id.clone())).await;
    Ok(json(StatusCode::CREATED, created))
}

/// Who a token is, as the console shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct WhoAmI {
    /// This agent's name.
    agent: String,
    /// `admin` or `tenant`.
    principal: &'static str,
    /// The tenant the request acts for: the token's, or the admin's `X-Deadlift-Tenant`.
    tenant: Option<String>,
}

#[utoipa::path(get, path = "/v1/whoami", tag = "tenants", security(("bearer" = [])),
    responses((status = 200, description = "The caller", body = WhoAmI)))]
pub(super) async fn whoami(State(agent): State<AgentState>, caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        agent: agent.federation().identity().name.clone(),
        principal: match caller.principal {
            Principal::Admin => "admin",
            Principal::Tenant(_) => "tenant",
        },
        tenant: caller.acting_for.clone(),
    })
}

#[utoipa::path(get, path = "/v1/tokens", tag = "tenants", security(("bearer" = [])),
    responses((status = 200, description = "Every token, without secrets"), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(super) async fn list_tokens(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let db = agent.db().clone();
    let tokens = blocking(move || Ok(db.tokens(None)?)).await?;
    Ok(Json(serde_json::json!({ "tokens": tokens })).into_response())
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tenants", security(("bearer" = [])),
    params(("id" = String, Path, description = "The token's id")),
    responses((status = 204, description = "Revoked"), (status = 404, description = "No such token", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(super) async fn revoke_token(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let db = agent.db().clone();
    let revoking = id.clone();
    let revoked = blocking(move || Ok(db.revoke_token(&revoking)?)).await?;
    if revoked {
        agent.changed(Setting::Token(id)).await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(Code::TokenNotFound, "no such token"))
    }
}
