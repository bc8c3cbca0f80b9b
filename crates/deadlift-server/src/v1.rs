//! The original Deadlift HTTP API (`docs/v1-api.md`), kept so existing clients and
//! modules work unchanged: `GET /status`, the module routes and the workflow routes
//! (pipelines of subjects, run by the workflow runtime and recorded as runs), acting for
//! the default tenant, with the contract's "must" error behaviour (JSON errors, 404/409/413/422).

use crate::Path;
use axum::extract::State;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deadlift_agent::workflow::TraceParent;

use crate::error::ErrorBody;
use axum::{Extension, Json, Router};
use serde::Serialize;

use crate::{AgentState, ApiError, Listening, RawBody, authenticate, multipart_error};
use deadlift_agent::agent::{V1_TENANT, V1Access};
use deadlift_agent::store::Principal;
use deadlift_agent::workflow::v1::V1_ENTRY;
use deadlift_engine::Code;
use deadlift_engine::registry::{self, ModuleError, ModuleId, NewModule};

pub(super) fn routes() -> Router<AgentState> {
    Router::new()
        .route("/status", get(status))
        .route("/api/v1/modules", post(upload).get(list))
        .route("/api/v1/modules/{hash}/execute", post(execute))
        .route("/api/v1/workflows", post(create_workflow))
        .route("/api/v1/workflows/{id}/execute", post(execute_workflow))
}

/// A v1 workflow: a pipeline of module subjects.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct NewV1Workflow {
    name: String,
    #[serde(default)]
    description: Option<String>,
    pipeline: Vec<String>,
}

#[utoipa::path(post, path = "/api/v1/workflows", tag = "v1", operation_id = "v1_create_workflow", security((), ("bearer" = [])),
    request_body(content = NewV1Workflow, description = "A pipeline of module subjects"),
    responses((status = 201, description = "The new workflow's integer id, as text", content_type = "text/plain", body = String),
        (status = 400, description = "Not such a document, or an unknown subject", body = ErrorBody),
        (status = 401, description = "A token is needed here", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(crate) async fn create_workflow(
    State(agent): State<AgentState>,
    Extension(listening): Extension<Listening>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    check_access(&agent, listening, &headers).await?;
    let request: NewV1Workflow = serde_json::from_slice(&body).map_err(|e| {
        let code = if e.is_data() {
            Code::MissingField
        } else {
            Code::InvalidJson
        };
        ApiError::new(
            code,
            format!("expected {{\"name\", \"description\"?, \"pipeline\": [subject, ...]}}: {e}"),
        )
    })?;
    // In a cluster, ids are one space across its agents, and the workflow is theirs too.
    let cluster_id = match agent.cluster() {
        Some(cluster) => {
            let here = agent.workflows().max_v1_id().await?;
            Some(cluster.next_v1_id(here).await?)
        }
        None => None,
    };
    let id = agent
        .workflows()
        .create_v1_as(
            cluster_id,
            V1_TENANT,
            &request.name,
            request.description,
            request.pipeline,
            agent.default_grant().clone(),
        )
        .await?;
    agent
        .changed(deadlift_agent::cluster::Setting::Workflow {
            tenant: V1_TENANT.to_owned(),
            name: deadlift_agent::workflow::v1::workflow_name(id),
        })
        .await;
    Ok((StatusCode::CREATED, id.to_string()).into_response())
}

#[utoipa::path(post, path = "/api/v1/workflows/{id}/execute", tag = "v1", operation_id = "v1_execute_workflow", security((), ("bearer" = [])),
    params(("id" = i64, Path, description = "The workflow's integer id")),
    request_body(content = serde_json::Value, description = "Any JSON value: the pipeline's input"),
    responses((status = 200, description = "The pipeline's output (any JSON value)", body = serde_json::Value),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 422, description = "A step failed", body = ErrorBody),
        (status = 401, description = "A token is needed here", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(crate) async fn execute_workflow(
    State(agent): State<AgentState>,
    Extension(listening): Extension<Listening>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    check_access(&agent, listening, &headers).await?;
    let not_found = || {
        ApiError::new(
            Code::WorkflowNotFound,
            format!("no workflow with id `{id}`"),
        )
    };
    let id: i64 = id.parse().map_err(|_| not_found())?;
    let input = json_body(&body)?;
    let output = agent
        .workflows()
        .execute_v1(
            V1_TENANT,
            id,
            input,
            headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(TraceParent::parse),
        )
        .await
        .map_err(|e| match e {
            deadlift_agent::workflow::WorkflowError::NotFound(_) => not_found(),
            other => other.into(),
        })?;
    Ok(Json(output).into_response())
}

/// A v1 execute body: any JSON value, not empty.
fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            Code::InvalidJson,
            "the body must be a JSON value, not empty",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            Code::InvalidJson,
            format!("the body is not valid JSON: {e}"),
        )
    })
}

#[utoipa::path(get, path = "/status", tag = "v1", operation_id = "v1_status",
    responses((status = 204, description = "The agent is up (the original's health check)")))]
pub(crate) async fn status() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The original needed no token, and ran next to its callers. Without a token these
/// routes are open only as the agent's `V1Access` says (by default: while it listens on
/// loopback alone). A token, when given or needed, must be the v1 tenant's or an
/// admin's: another tenant's token opens nothing here.
async fn check_access(
    agent: &AgentState,
    listening: Listening,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let open = match agent.v1_access() {
        V1Access::Open => true,
        V1Access::OpenOnLoopback => listening.loopback,
        V1Access::Token => false,
    };
    if open && !headers.contains_key(header::AUTHORIZATION) {
        return Ok(());
    }
    let caller = authenticate(agent, headers).await?;
    match &caller.principal {
        Principal::Admin => Ok(()),
        Principal::Tenant(tenant) if tenant == V1_TENANT => Ok(()),
        Principal::Tenant(tenant) => Err(ApiError::new(
            Code::Forbidden,
            format!(
                "the v1 routes act for tenant `{V1_TENANT}`; a token of tenant `{tenant}` cannot use them"
            ),
        )),
    }
}

#[utoipa::path(post, path = "/api/v1/modules", tag = "v1", security((), ("bearer" = [])), operation_id = "v1_upload_module",
    request_body(content = String, content_type = "multipart/form-data", description = "Fields `binary` (the .wasm file), `subject`, `title`, `description`"),
    responses((status = 201, description = "The module's hash (hex), as text", content_type = "text/plain", body = String),
        (status = 400, description = "Not a valid plug-in, or a field missing", body = ErrorBody),
        (status = 409, description = "The subject is taken by other bytes", body = ErrorBody),
        (status = 413, description = "Over the size limit", body = ErrorBody),
        (status = 401, description = "A token is needed here", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(crate) async fn upload(
    State(agent): State<AgentState>,
    Extension(listening): Extension<Listening>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    check_access(&agent, listening, &headers).await?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            Code::NotMultipart,
            format!("expected multipart/form-data: {}", e.body_text()),
        )
    })?;
    let (mut binary, mut title, mut subject, mut description) = (None, None, None, None);
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "binary" => binary = Some(field.bytes().await.map_err(multipart_error)?),
            "title" => title = Some(field.text().await.map_err(multipart_error)?),
            "subject" => subject = Some(field.text().await.map_err(multipart_error)?),
            "description" => description = Some(field.text().await.map_err(multipart_error)?),
            _ => {}
        }
    }
    let missing = |field: &str| {
        ApiError::new(
            Code::MissingField,
            format!("the form field `{field}` is required"),
        )
    };
    let binary = binary.ok_or_else(|| missing("binary"))?;
    let title = title
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| missing("title"))?;
    let subject = subject
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| missing("subject"))?;

    let inspection = registry::inspect(&binary)?;
    if !inspection.has_function(V1_ENTRY) {
        return Err(ApiError::new(
            Code::ModuleMissingMain,
            "a Deadlift v1 module must export the function `_main`",
        ));
    }
    let engine = agent.engine().clone();
    let module = NewModule {
        name: subject.clone(),
        title: Some(title),
        version: None,
        description: description.filter(|d| !d.is_empty()),
        bytes: binary.to_vec(),
    };
    let added = tokio::task::spawn_blocking(move || {
        // A subject, once taken, keeps its bytes (as the v1 contract says): otherwise
        // anyone who can reach the route could swap the code a workflow runs.
        let id = registry::ModuleId::of(&module.bytes);
        if let Some(taken) = engine
            .registry()
            .list(V1_TENANT)?
            .into_iter()
            .find(|m| m.name == module.name && m.id != id)
        {
            return Err(ModuleError::NameConflict {
                name: module.name,
                version: None,
                existing: taken.id,
            });
        }
        engine.add_module(V1_TENANT, module)
    })
    .await?;
    match added {
        Ok(info) => {
            agent
                .changed(deadlift_agent::cluster::Setting::Module {
                    tenant: info.tenant.clone(),
                    id: info.id,
                })
                .await;
            Ok((
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                info.id.hex(),
            )
                .into_response())
        }
        Err(ModuleError::NameConflict { existing, .. }) => Err(ApiError::new(
            Code::ModuleConflict,
            format!(
                "subject `{subject}` is already used by module {}",
                existing.hex()
            ),
        )),
        Err(ModuleError::InvalidName) => Err(ApiError::new(
            Code::ModuleNameInvalid,
            "subject must be 1-128 characters of letters, digits, '.', '-' or '_'",
        )),
        Err(other) => Err(other.into()),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct V1Module {
    hash: String,
    title: String,
    description: String,
    subject: String,
}

#[utoipa::path(get, path = "/api/v1/modules", tag = "v1", operation_id = "v1_list_modules", security((), ("bearer" = [])),
    responses((status = 200, description = "The v1 tenant's modules", body = Vec<V1Module>),
        (status = 401, description = "A token is needed here", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(crate) async fn list(
    State(agent): State<AgentState>,
    Extension(listening): Extension<Listening>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_access(&agent, listening, &headers).await?;
    let engine = agent.engine().clone();
    let modules = tokio::task::spawn_blocking(move || engine.registry().list(V1_TENANT)).await??;
    let listed: Vec<V1Module> = modules
        .into_iter()
        .map(|m| V1Module {
            hash: m.id.hex(),
            title: m.title.unwrap_or_else(|| m.name.clone()),
            description: m.description.unwrap_or_default(),
            subject: m.name,
        })
        .collect();
    Ok(Json(listed).into_response())
}

#[utoipa::path(post, path = "/api/v1/modules/{hash}/execute", tag = "v1", operation_id = "v1_execute_module", security((), ("bearer" = [])),
    params(("hash" = String, Path, description = "The module's hash (hex)")),
    request_body(content = serde_json::Value, description = "Any JSON value: the module's input"),
    responses((status = 200, description = "The module's output (any JSON value)", body = serde_json::Value),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 404, description = "No such module", body = ErrorBody),
        (status = 422, description = "The plug-in failed, or its output is not JSON", body = ErrorBody),
        (status = 401, description = "A token is needed here", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
pub(crate) async fn execute(
    State(agent): State<AgentState>,
    Extension(listening): Extension<Listening>,
    Path(hash): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    check_access(&agent, listening, &headers).await?;
    let not_found = || {
        ApiError::new(
            Code::ModuleNotFound,
            format!("no module with hash `{hash}`"),
        )
    };
    let id: ModuleId = hash.parse().map_err(|_| not_found())?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            Code::InvalidJson,
            "the body must be a JSON value, not empty",
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(|e| {
        ApiError::new(
            Code::InvalidJson,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let (started, called) = agent
        .call_pinned(V1_TENANT, &id, V1_ENTRY, &body, agent.default_grant())
        .await;
    crate::api::export_call(
        &agent,
        V1_TENANT,
        &id,
        V1_ENTRY,
        &headers,
        started,
        agent.default_grant(),
        &called,
    );
    let out = called.map_err(|e| match e {
        deadlift_engine::CallError::ModuleNotFound { .. } => not_found(),
        other => other.into(),
    })?;
    if serde_json::from_slice::<serde::de::IgnoredAny>(&out.output).is_err() {
        return Err(ApiError::new(
            Code::OutputNotJson,
            "the module's output is not JSON",
        ));
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], out.output).into_response())
}
