//! Federation over HTTP: this agent's identity (public), peers and the outbox (admin),
//! and `POST /v1/peer/events`, where other agents deliver signed events. A delivery is
//! authenticated by its signature, not by a token: unknown peer, bad or stale signature
//! → 401; an event type the peer may not send → 403; otherwise it is committed
//! (deduplicated by id) and answered 200.

use crate::{Path, Query, page_limit};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, RawBody, json, parse_json};
use deadlift_agent::cluster::Setting;
use deadlift_agent::federation::{
    FederationError, OutboxEntry, OutboxStatus, Peer, PeerView, Received, Webhook,
};

impl From<FederationError> for ApiError {
    fn from(e: FederationError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

pub(super) fn routes() -> Router<AgentState> {
    Router::new()
        .route("/v1/identity", get(identity))
        .route("/v1/peers", get(list_peers).post(add_peer))
        .route("/v1/peers/{name}", delete(remove_peer))
        .route("/v1/outbox", get(outbox))
        .route("/v1/outbox/{id}/replay", post(replay))
        .route("/v1/peer/events", post(receive))
        .route("/v1/peer-views", get(list_views))
        .route("/v1/peer-views/{peer}", put(set_view).delete(remove_view))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct IdentityInfo {
    name: String,
    /// Ed25519, base64: what peers register for this agent.
    public_key: String,
}

#[utoipa::path(get, path = "/v1/identity", tag = "federation",
    responses((status = 200, description = "This agent's name and public key", body = IdentityInfo)))]
pub(super) async fn identity(State(agent): State<AgentState>) -> Json<IdentityInfo> {
    let identity = agent.federation().identity();
    Json(IdentityInfo {
        name: identity.name.clone(),
        public_key: identity.public_key(),
    })
}

#[utoipa::path(get, path = "/v1/peers", tag = "federation", security(("bearer" = [])),
    responses((status = 200, description = "Peers (admin)", body = Vec<Peer>)))]
pub(super) async fn list_peers(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Json<Vec<Peer>>, ApiError> {
    caller.require_admin()?;
    Ok(Json(agent.federation().peers()))
}

#[utoipa::path(post, path = "/v1/peers", tag = "federation", security(("bearer" = [])),
    request_body = Peer,
    responses((status = 201, description = "Registered (or replaced)", body = Peer),
        (status = 400, description = "Invalid", body = ErrorBody)))]
pub(super) async fn add_peer(
    State(agent): State<AgentState>,
    caller: Caller,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let peer: Peer = parse_json(&body)?;
    let stored = agent.federation().add_peer(peer).await?;
    agent.changed(Setting::Peer(stored.name.clone())).await;
    Ok(json(StatusCode::CREATED, stored))
}

#[utoipa::path(delete, path = "/v1/peers/{name}", tag = "federation", security(("bearer" = [])), params(("name" = String, Path, description = "The peer's name")),
    responses((status = 204, description = "Removed"), (status = 404, description = "No such peer", body = ErrorBody)))]
pub(super) async fn remove_peer(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    agent.federation().remove_peer(&name).await?;
    agent.changed(Setting::Peer(name)).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct OutboxQuery {
    status: Option<OutboxStatus>,
    /// At most this many (default 100, at most 500).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/outbox", tag = "federation", security(("bearer" = [])), params(OutboxQuery),
    responses((status = 200, description = "Deliveries to peers, newest first (admin)", body = Vec<OutboxEntry>)))]
pub(super) async fn outbox(
    State(agent): State<AgentState>,
    caller: Caller,
    Query(query): Query<OutboxQuery>,
) -> Result<Json<Vec<OutboxEntry>>, ApiError> {
    caller.require_admin()?;
    Ok(Json(
        agent
            .federation()
            .outbox(query.status, page_limit(query.limit, 100)?)
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/outbox/{id}/replay", tag = "federation", security(("bearer" = [])), params(("id" = i64, Path, description = "The delivery's id")),
    responses((status = 202, description = "Queued again"), (status = 409, description = "Not dead", body = ErrorBody)))]
pub(super) async fn replay(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    agent.federation().replay(id).await?;
    Ok(StatusCode::ACCEPTED)
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[utoipa::path(post, path = "/v1/peer/events", tag = "federation",
    request_body(content = deadlift_agent::workflow::CloudEvent, content_type = "application/cloudevents+json",
        description = "Signed: webhook-id, webhook-timestamp, webhook-signature (v1a, Ed25519) and deadlift-peer headers"),
    responses((status = 200, description = "Committed (or already received)", body = Received),
        (status = 401, description = "Unknown peer, or a bad or stale signature", body = ErrorBody),
        (status = 403, description = "The peer may not send this event type", body = ErrorBody)))]
pub(super) async fn receive(
    State(agent): State<AgentState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let webhook = Webhook::from_headers(|name| header_text(&headers, name))?;
    let content_type = header_text(&headers, header::CONTENT_TYPE.as_str()).unwrap_or_default();
    let received = agent
        .federation()
        .receive(&webhook, content_type, &body)
        .await?;
    Ok(json(StatusCode::OK, received))
}

/// A token the tenant holds on a peer's agent.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ViewToken {
    /// A bearer token of this tenant's on the peer's agent; used only to read traces there.
    token: String,
}

#[utoipa::path(get, path = "/v1/peer-views", tag = "federation", security(("bearer" = [])),
    responses((status = 200, description = "The tenant's peers whose side of a trace it can see (never the tokens)", body = Vec<PeerView>)))]
pub(super) async fn list_views(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Json<Vec<PeerView>>, ApiError> {
    let tenant = caller.tenant()?;
    Ok(Json(agent.federation().views(&tenant).await?))
}

/// Stores the token the tenant holds on a peer's agent, so that trace pages show that side.
#[utoipa::path(put, path = "/v1/peer-views/{peer}", tag = "federation", security(("bearer" = [])),
    params(("peer" = String, Path, description = "A peer serving the tenant")),
    request_body = ViewToken,
    responses((status = 200, description = "Stored", body = PeerView),
        (status = 400, description = "Invalid token", body = ErrorBody),
        (status = 404, description = "No such peer serves the tenant", body = ErrorBody)))]
pub(super) async fn set_view(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(peer): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<PeerView>, ApiError> {
    let tenant = caller.tenant()?;
    let view: ViewToken = parse_json(&body)?;
    let stored = agent
        .federation()
        .set_view_token(&tenant, &peer, &view.token)
        .await?;
    Ok(Json(stored))
}

#[utoipa::path(delete, path = "/v1/peer-views/{peer}", tag = "federation", security(("bearer" = [])),
    params(("peer" = String, Path, description = "A peer serving the tenant")),
    responses((status = 204, description = "Forgotten"),
        (status = 404, description = "No view token for that peer", body = ErrorBody)))]
pub(super) async fn remove_view(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(peer): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.tenant()?;
    agent.federation().remove_view_token(&tenant, &peer).await?;
    Ok(StatusCode::NO_CONTENT)
}
