//! The JSON API under `/v1`: modules (upload, list, get, delete, call), tenants and
//! tokens (admin), and a tenant's key-value entries. Every route acts for the caller's
//! tenant; nothing here can reach another tenant's data.

use std::collections::BTreeMap;

use crate::{Path, Query};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;
use crate::{AgentState, ApiError, Caller, RawBody, json, multipart_error, parse_json};
use crate::{hooks, peers, policy, tenants, v1, workflows};
use deadlift_agent::cluster::Setting;
use deadlift_agent::direct::{CallLimits, DirectCallError};
use deadlift_agent::manifest::{Manifest, ManifestError};
use deadlift_agent::store::TokenInfo;
use deadlift_agent::telemetry::CallSpan;
use deadlift_agent::workflow::TraceParent;
use deadlift_engine::Code;
use deadlift_engine::LogLine;
use deadlift_engine::host::KvStore;
use deadlift_engine::registry::{ModuleInfo, NewModule};

pub(super) fn routes() -> Router<AgentState> {
    Router::new()
        .route("/v1/modules", get(list_modules).post(upload_module))
        .route(
            "/v1/modules/{reference}",
            get(get_module).delete(delete_module),
        )
        .route("/v1/modules/{reference}/call/{function}", post(call_module))
        .route(
            "/v1/modules/{reference}/replay",
            post(crate::replay::replay_calls),
        )
        .route(
            "/v1/modules/{reference}/manifest",
            get(get_manifest).put(put_manifest),
        )
        .route("/v1/kv", get(list_kv))
        .route("/v1/kv/{key}", get(get_kv).put(put_kv).delete(delete_kv))
        .route("/v1/openapi.json", get(openapi))
}

/// The API's description, generated from the handlers and types above.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Deadlift agent API", description = "Run Extism plug-ins next to your data."),
    paths(
        list_modules, upload_module, get_module, delete_module, call_module,
        put_manifest, get_manifest,
        tenants::create_tenant, tenants::list_tenants, tenants::create_token,
        tenants::list_tokens, tenants::revoke_token,
        list_kv, get_kv, put_kv, delete_kv,
        workflows::apply_workflow, workflows::list_workflows, workflows::get_workflow,
        workflows::delete_workflow, workflows::start_run, workflows::publish_events,
        workflows::list_runs, workflows::get_run, workflows::retry_run, workflows::cancel_run,
        workflows::live_runs, workflows::list_dead_letters, workflows::replay_dead_letter,
        workflows::get_trace, tenants::whoami, crate::replay::replay_calls,
        crate::releases::get_release, crate::releases::start_rollout, crate::releases::promote,
        crate::releases::rollback,
        peers::identity, peers::list_peers, peers::add_peer, peers::remove_peer,
        peers::outbox, peers::replay, peers::receive,
        peers::list_views, peers::set_view, peers::remove_view,
        hooks::list, hooks::bind, hooks::unbind,
        policy::get_policy, policy::put_policy,
        crate::healthz, crate::readyz, crate::metrics,
        crate::ui::index, crate::ui::script, crate::ui::style,
        v1::status, v1::upload, v1::list, v1::execute, v1::create_workflow, v1::execute_workflow
    ),
    components(schemas(ErrorBody, ModuleInfo, CallResponse, LogLine, TokenInfo, tenants::CreatedToken, tenants::NewTenant, tenants::NewToken)),
    modifiers(&BearerAuth)
)]
pub(super) struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Every operation that takes a token answers 401 without one and 403 when the
        // token may not act, and every one that takes input may answer 400: say so once,
        // here, rather than on every handler.
        use utoipa::openapi::{Ref, RefOr, ResponseBuilder};
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                // Anything that takes input can refuse it with 400.
                let takes_input = operation.request_body.is_some()
                    || operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
                if takes_input {
                    operation
                        .responses
                        .responses
                        .entry("400".to_owned())
                        .or_insert_with(|| {
                            error("The request is malformed: a bad parameter or body")
                        });
                }
                if operation.security.as_ref().is_none_or(Vec::is_empty) {
                    continue;
                }
                let responses = &mut operation.responses.responses;
                responses
                    .entry("401".to_owned())
                    .or_insert_with(|| error("No token, or not a valid one"));
                responses
                    .entry("403".to_owned())
                    .or_insert_with(|| error("The token may not do this"));
            }
        }
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi())
}

/// Runs blocking storage work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await?
}

#[utoipa::path(get, path = "/v1/modules", tag = "modules", security(("bearer" = [])),
    responses((status = 200, description = "The tenant's modules", body = Vec<ModuleInfo>), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn list_modules(
    State(agent): State<AgentState>,
    caller: Caller,
) -> Result<Json<Vec<ModuleInfo>>, ApiError> {
    let tenant = caller.tenant()?;
    let engine = agent.engine().clone();
    Ok(Json(
        blocking(move || Ok(engine.registry().list(&tenant)?)).await?,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    name: String,
    version: Option<String>,
    title: Option<String>,
    description: Option<String>,
}

/// Upload: the module's bytes as the body, its metadata in the query string.
#[utoipa::path(post, path = "/v1/modules", tag = "modules", security(("bearer" = [])), params(UploadQuery),
    request_body(content((String = "application/wasm"), (String = "application/octet-stream")), description = "The module's Wasm bytes, metadata in the query string; or multipart/form-data with the file in `module` and fields `name`, `version`, `title`, `description`"),
    responses((status = 201, description = "Registered (or already registered identically)", body = ModuleInfo),
        (status = 400, description = "Not a valid Extism plug-in, or metadata missing", body = ErrorBody),
        (status = 409, description = "Name and version taken by other bytes", body = ErrorBody),
        (status = 413, description = "Body over the size limit, or the module over the module size cap (`module_too_large`)", body = ErrorBody),
        (status = 429, description = "The tenant is already compiling a module", body = ErrorBody),
        (status = 503, description = "No compile slot came free in time", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn upload_module(
    State(agent): State<AgentState>,
    caller: Caller,
    headers: HeaderMap,
    query: Result<axum::extract::Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let module = if multipart {
        let form = Multipart::from_request(request, &agent)
            .await
            .map_err(|e| ApiError::new(Code::NotMultipart, e.body_text()))?;
        module_from_form(form).await?
    } else {
        let axum::extract::Query(query) = query.map_err(|e| {
            ApiError::new(
                Code::MissingField,
                format!(
                    "send the module as the body with its metadata in the query string \
                     (name, version, title, description), or as multipart/form-data: {}",
                    e.body_text()
                ),
            )
        })?;
        let RawBody(body) = RawBody::from_request(request, &agent).await?;
        NewModule {
            name: query.name,
            title: query.title,
            version: query.version,
            description: query.description,
            bytes: body.to_vec(),
        }
    };
    let engine = agent.engine().clone();
    let info = blocking(move || Ok(engine.add_module(&tenant, module)?)).await?;
    agent
        .changed(Setting::Module {
            tenant: info.tenant.clone(),
            id: info.id,
        })
        .await;
    Ok(json(StatusCode::CREATED, info))
}

/// A module from a form: the file in field `module`, metadata in `name`, `version`,
/// `title` and `description`.
async fn module_from_form(mut form: Multipart) -> Result<NewModule, ApiError> {
    let mut module = NewModule::default();
    let mut bytes = None;
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "module" {
            bytes = Some(field.bytes().await.map_err(multipart_error)?.to_vec());
            continue;
        }
        let value = field.text().await.map_err(multipart_error)?;
        match name.as_str() {
            "name" => module.name = value,
            "version" => module.version = Some(value),
            "title" => module.title = Some(value),
            "description" => module.description = Some(value),
            _ => {}
        }
    }
    module.bytes = bytes
        .ok_or_else(|| ApiError::new(Code::MissingField, "the form field `module` is required"))?;
    if module.name.is_empty() {
        return Err(ApiError::new(
            Code::MissingField,
            "the form field `name` is required",
        ));
    }
    Ok(module)
}

pub(crate) async fn resolve(
    agent: &AgentState,
    tenant: String,
    reference: String,
) -> Result<ModuleInfo, ApiError> {
    let engine = agent.engine().clone();
    blocking(move || Ok(engine.registry().resolve(&tenant, &reference)?)).await
}

#[utoipa::path(put, path = "/v1/modules/{reference}/manifest", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "`name`, `name@version` or `sha256:<hex>`")),
    request_body = Manifest,
    responses((status = 200, description = "Stored: direct calls of the module run with it", body = Manifest),
        (status = 400, description = "Not a manifest, or over the operator's policy (each field in `details.errors`)", body = ErrorBody),
        (status = 404, description = "No such module", body = ErrorBody)))]
async fn put_manifest(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(reference): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<Manifest>, ApiError> {
    let tenant = caller.tenant()?;
    let manifest: Manifest = parse_json(&body)?;
    let id = agent
        .set_manifest(&tenant, &reference, manifest.clone())
        .await?;
    agent.changed(Setting::Manifest { tenant, id }).await;
    Ok(Json(manifest))
}

#[utoipa::path(get, path = "/v1/modules/{reference}/manifest", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "`name`, `name@version` or `sha256:<hex>`")),
    responses((status = 200, description = "The module's manifest", body = Manifest),
        (status = 404, description = "No such module, or none stored", body = ErrorBody)))]
async fn get_manifest(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(reference): Path<String>,
) -> Result<Json<Manifest>, ApiError> {
    let tenant = caller.tenant()?;
    let info = resolve(&agent, tenant.clone(), reference.clone()).await?;
    agent
        .manifest(&tenant, &info.id)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                Code::ModuleNotFound,
                format!("module `{reference}` has no manifest"),
            )
        })
}

impl From<DirectCallError> for ApiError {
    fn from(e: DirectCallError) -> Self {
        match e {
            DirectCallError::Module(e) => e.into(),
            DirectCallError::Manifest(e) => e.into(),
        }
    }
}

impl From<ManifestError> for ApiError {
    fn from(e: ManifestError) -> Self {
        match &e {
            ManifestError::OverPolicy(excess) => {
                let errors: Vec<serde_json::Value> = excess
                    .iter()
                    .map(|x| serde_json::json!({ "field": x.field, "message": x.message }))
                    .collect();
                Self::new(e.code(), e.to_string())
                    .with_details(serde_json::json!({ "errors": errors }))
            }
            _ => Self::new(e.code(), e.to_string()),
        }
    }
}

#[utoipa::path(get, path = "/v1/modules/{reference}", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "`name`, `name@version` or `sha256:<hex>`")),
    responses((status = 200, description = "The module", body = ModuleInfo), (status = 404, description = "No such module", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn get_module(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(reference): Path<String>,
) -> Result<Json<ModuleInfo>, ApiError> {
    let tenant = caller.tenant()?;
    Ok(Json(resolve(&agent, tenant, reference).await?))
}

#[utoipa::path(delete, path = "/v1/modules/{reference}", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "`name`, `name@version` or `sha256:<hex>`")),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such module", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn delete_module(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(reference): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.tenant()?;
    let info = resolve(&agent, tenant.clone(), reference).await?;
    // It lists the tenant's modules: off the async threads.
    let (releases, owner, module) = (agent.releases().clone(), tenant.clone(), info.clone());
    if let Some(reason) = blocking(move || Ok(releases.in_use(&owner, &module))).await? {
        return Err(ApiError::new(Code::ModuleInUse, reason));
    }
    if let Some(workflow) = agent.workflows().module_in_use(&tenant, &info).await? {
        return Err(ApiError::new(
            Code::ModuleInUse,
            format!("workflow `{workflow}` calls this module; change or delete the workflow first"),
        ));
    }
    let engine = agent.engine().clone();
    let (owner, id) = (tenant.clone(), info.id);
    blocking(move || Ok(engine.delete_module(&owner, &id)?)).await?;
    agent.changed(Setting::Module { tenant, id }).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The result of a call as JSON: the output as JSON when it is JSON, as text when it
/// is UTF-8, as hex otherwise.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CallResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_hex: Option<String>,
    logs: Vec<LogLine>,
    fuel_used: u64,
    duration_us: u64,
    /// The module that served the call (`sha256:…`).
    module: String,
    /// Its version, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    /// Whether a canary of the module's name served the call.
    canary: bool,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct CallQuery {
    /// `raw` answers with the output bytes themselves.
    #[serde(default)]
    format: Option<String>,
    /// Narrows this call's time limit (ms); never widens the module's grant.
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Narrows this call's fuel budget; never widens the module's grant.
    #[serde(default)]
    fuel: Option<u64>,
}

#[utoipa::path(post, path = "/v1/modules/{reference}/call/{function}", tag = "modules", security(("bearer" = [])),
    params(("reference" = String, Path, description = "`name`, `name@version` or `sha256:<hex>`"),
        ("function" = String, Path, description = "The exported function"), CallQuery),
    request_body(content = String, content_type = "application/octet-stream", description = "The call's input bytes"),
    responses((status = 200, description = "The call's output", body = CallResponse),
        (status = 404, description = "No such module or function", body = ErrorBody),
        (status = 413, description = "Input over the limit", body = ErrorBody),
        (status = 422, description = "The plug-in failed: trap, guest error, time, fuel or memory limit, denied import", body = ErrorBody),
        (status = 429, description = "The tenant has too many calls waiting, or they waited too long: shed; retry after `Retry-After` seconds", body = ErrorBody),
        (status = 503, description = "The engine is at capacity", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn call_module(
    State(agent): State<AgentState>,
    caller: Caller,
    Path((reference, function)): Path<(String, String)>,
    Query(query): Query<CallQuery>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let limits = CallLimits {
        timeout: query.timeout_ms.map(std::time::Duration::from_millis),
        fuel: query.fuel,
    };
    let call = agent
        .call_module(&tenant, &reference, &function, &body, limits)
        .await?;
    export_call(
        &agent,
        &tenant,
        &call.module,
        &function,
        &headers,
        call.started,
        &call.grant,
        &call.result,
    );
    let served = [
        (
            header::HeaderName::from_static("x-deadlift-module"),
            call.module.to_string(),
        ),
        (
            header::HeaderName::from_static("x-deadlift-module-version"),
            call.version.clone().unwrap_or_default(),
        ),
        (
            header::HeaderName::from_static("x-deadlift-canary"),
            call.canary.to_string(),
        ),
    ];
    let out = call.result?;
    if query.format.as_deref() == Some("raw") {
        return Ok((
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (
                    header::HeaderName::from_static("x-deadlift-fuel-used"),
                    out.fuel_used.to_string(),
                ),
                (
                    header::HeaderName::from_static("x-deadlift-duration-us"),
                    out.duration.as_micros().to_string(),
                ),
            ],
            served,
            out.output,
        )
            .into_response());
    }
    let (mut output, mut output_text, mut output_hex) = (None, None, None);
    match serde_json::from_slice::<serde_json::Value>(&out.output) {
        Ok(value) => output = Some(value),
        Err(_) => match String::from_utf8(out.output) {
            Ok(text) => output_text = Some(text),
            Err(e) => output_hex = Some(hex::encode(e.into_bytes())),
        },
    }
    Ok(Json(CallResponse {
        output,
        output_text,
        output_hex,
        logs: out.logs,
        fuel_used: out.fuel_used,
        duration_us: u64::try_from(out.duration.as_micros()).unwrap_or(u64::MAX),
        module: call.module.to_string(),
        version: call.version,
        canary: call.canary,
    })
    .into_response())
}

/// Exports a direct call as a span, when the agent exports spans: in the caller's trace
/// when its `traceparent` header carries one.
#[allow(clippy::too_many_arguments)]
pub(crate) fn export_call(
    agent: &deadlift_agent::Agent,
    tenant: &str,
    module: &deadlift_engine::registry::ModuleId,
    function: &str,
    headers: &HeaderMap,
    started: std::time::SystemTime,
    grant: &deadlift_engine::Grant,
    called: &Result<deadlift_engine::CallOutput, deadlift_engine::CallError>,
) {
    let Some(telemetry) = agent.telemetry() else {
        return;
    };
    telemetry.record_call(CallSpan {
        tenant: tenant.to_owned(),
        module: module.to_string(),
        function: function.to_owned(),
        parent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse),
        started,
        duration: started.elapsed().unwrap_or_default(),
        fuel_used: called
            .as_ref()
            .ok()
            .filter(|_| grant.fuel.is_some())
            .map(|out| out.fuel_used),
        error: called.as_ref().err().map(|e| e.code().as_str().to_owned()),
    });
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct KvQuery {
    #[serde(default)]
    prefix: String,
}

#[utoipa::path(get, path = "/v1/kv", tag = "kv", security(("bearer" = [])), params(KvQuery),
    responses((status = 200, description = "The tenant's keys"), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn list_kv(
    State(agent): State<AgentState>,
    caller: Caller,
    Query(query): Query<KvQuery>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let db = agent.db().clone();
    let keys = blocking(move || Ok(db.keys(&tenant, &query.prefix)?)).await?;
    Ok(Json(BTreeMap::from([("keys", keys)])).into_response())
}

#[utoipa::path(get, path = "/v1/kv/{key}", tag = "kv", security(("bearer" = [])), params(("key" = String, Path, description = "The key")),
    responses((status = 200, description = "The value's bytes", content_type = "application/octet-stream"), (status = 404, description = "No such key", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn get_kv(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant()?;
    let db = agent.db().clone();
    let value = blocking(move || Ok(KvStore::get(&db, &tenant, &key)?)).await?;
    match value {
        Some(value) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response())
        }
        None => Err(ApiError::new(Code::KeyNotFound, "no such key")),
    }
}

#[utoipa::path(put, path = "/v1/kv/{key}", tag = "kv", security(("bearer" = [])), params(("key" = String, Path, description = "The key")),
    request_body(content = Option<String>, content_type = "application/octet-stream", description = "The value's bytes (none: an empty value)"),
    responses((status = 204, description = "Stored"), (status = 400, description = "Invalid key", body = ErrorBody), (status = 413, description = "Value too large", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn put_kv(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(key): Path<String>,
    RawBody(body): RawBody,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.tenant()?;
    if key.is_empty() || key.len() > deadlift_engine::host::MAX_KV_KEY_BYTES {
        return Err(ApiError::new(
            Code::InvalidInput,
            "keys are 1 to 1024 bytes long",
        ));
    }
    if body.len() > deadlift_engine::host::MAX_KV_VALUE_BYTES {
        return Err(ApiError::new(
            Code::PayloadTooLarge,
            "values are at most 1 MiB",
        ));
    }
    let db = agent.db().clone();
    blocking(move || Ok(KvStore::set(&db, &tenant, &key, &body)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/kv/{key}", tag = "kv", security(("bearer" = [])), params(("key" = String, Path, description = "The key")),
    responses((status = 204, description = "Deleted"), (status = 404, description = "No such key", body = ErrorBody), (status = 401, description = "No or an invalid token", body = ErrorBody), (status = 403, description = "The token may not do this", body = ErrorBody)))]
async fn delete_kv(
    State(agent): State<AgentState>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = caller.tenant()?;
    let db = agent.db().clone();
    if blocking(move || Ok(KvStore::delete(&db, &tenant, &key)?)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(Code::KeyNotFound, "no such key"))
    }
}
