//! The one HTTP error type. Every failure a client can cause becomes an [`ApiError`]
//! with a stable code; [`status_of`] is the single table from codes to statuses, and
//! the body is always `{"error": {"code": "...", "message": "..."}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::CallError;
use crate::host::KvError;
use crate::registry::ModuleError;
use crate::store::DbError;
use crate::workflow::WorkflowError;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
    /// Structured detail, e.g. the fields of a refused workflow document.
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn status(&self) -> StatusCode {
        status_of(self.code)
    }
}

/// The status of every error code: the one place they are mapped.
pub fn status_of(code: &str) -> StatusCode {
    match code {
        "bad_request"
        | "invalid_json"
        | "missing_field"
        | "not_multipart"
        | "invalid_input"
        | "module_invalid"
        | "module_import_invalid"
        | "module_name_invalid"
        | "module_id_invalid"
        | "module_missing_main"
        | "grant_invalid"
        | "tenant_invalid"
        | "subject_unknown"
        | "pipeline_empty"
        | "workflow_invalid"
        | "event_invalid"
        | "peer_invalid"
        | "binding_invalid" => StatusCode::BAD_REQUEST,
        "unauthorized" | "peer_unknown" | "signature_invalid" | "signature_expired" => {
            StatusCode::UNAUTHORIZED
        }
        "forbidden" | "event_not_accepted" => StatusCode::FORBIDDEN,
        "not_found"
        | "route_not_found"
        | "module_not_found"
        | "function_not_found"
        | "tenant_not_found"
        | "token_not_found"
        | "key_not_found"
        | "workflow_not_found"
        | "run_not_found"
        | "peer_not_found"
        | "hook_not_found"
        | "hook_not_bound"
        | "dead_letter_not_found" => StatusCode::NOT_FOUND,
        "method_not_allowed" => StatusCode::METHOD_NOT_ALLOWED,
        "module_conflict" | "tenant_exists" | "module_in_use" | "run_not_retryable"
        | "run_not_open" | "delivery_not_dead" => StatusCode::CONFLICT,
        "payload_too_large" | "input_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "unsupported_media_type" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "trap"
        | "guest_error"
        | "guest_exit_code"
        | "timeout"
        | "cancelled"
        | "fuel_exhausted"
        | "memory_limit"
        | "output_too_large"
        | "host_function_denied"
        | "host_function_unknown"
        | "host_function_failed"
        | "import_denied"
        | "function_signature"
        | "link_failed"
        | "output_not_json"
        | "http_denied"
        | "expression_failed"
        | "event_chain_too_deep"
        | "run_failed" => StatusCode::UNPROCESSABLE_ENTITY,
        "overloaded" | "shutting_down" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `module_not_found`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Structured detail where there is some (e.g. `errors: [{field, message}]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code, "{}", self.message);
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                details: self.details,
            },
        };
        (status, Json(body)).into_response()
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl From<ModuleError> for ApiError {
    fn from(e: ModuleError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        Self::new("storage", e.to_string())
    }
}

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> Self {
        match &e {
            WorkflowError::Spec(spec) => Self::new(e.code(), e.to_string())
                .with_details(serde_json::json!({ "errors": spec.field_errors() })),
            WorkflowError::RunFailed(failure) => {
                Self::new(run_failure_code(&failure.code), failure.message.clone())
                    .with_details(serde_json::json!({ "step": failure.step, "kind": failure.kind }))
            }
            _ => Self::new(e.code(), e.to_string()),
        }
    }
}

/// The stable code of a failed run, when it is one this table knows; `run_failed` else.
fn run_failure_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "module_not_found",
        "function_not_found",
        "function_signature",
        "host_function_denied",
        "host_function_unknown",
        "import_denied",
        "link_failed",
        "input_too_large",
        "output_too_large",
        "timeout",
        "cancelled",
        "fuel_exhausted",
        "memory_limit",
        "trap",
        "guest_error",
        "guest_exit_code",
        "host_function_failed",
        "http_denied",
        "grant_invalid",
        "overloaded",
        "output_not_json",
        "expression_failed",
        "event_chain_too_deep",
        "workflow_not_found",
    ];
    KNOWN
        .iter()
        .find(|known| **known == code)
        .copied()
        .unwrap_or("run_failed")
}

impl From<KvError> for ApiError {
    fn from(e: KvError) -> Self {
        Self::new("storage", e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::new("internal", format!("a background task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_error_code_has_a_client_or_capacity_status() {
        let samples = [
            CallError::Trap {
                message: String::new(),
            },
            CallError::Timeout {
                limit: std::time::Duration::ZERO,
            },
            CallError::FunctionNotFound {
                function: String::new(),
            },
            CallError::ModuleNotFound {
                module: String::new(),
            },
            CallError::InputTooLarge { size: 1, limit: 0 },
            CallError::Overloaded {
                reason: String::new(),
            },
            CallError::GrantInvalid {
                reason: String::new(),
            },
        ];
        for error in samples {
            let status = status_of(error.code());
            assert!(
                status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE,
                "{} -> {status}",
                error.code()
            );
        }
        assert_eq!(status_of("no_such_code"), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
