//! The one HTTP error type. Every failure a client can cause becomes an [`ApiError`]
//! with a stable [`Code`], which knows its own status; the body is always
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use deadlift_engine::Code;

use deadlift_agent::store::DbError;
use deadlift_agent::workflow::WorkflowError;
use deadlift_engine::error::CallError;
use deadlift_engine::host::KvError;
use deadlift_engine::registry::ModuleError;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Structured detail, e.g. the fields of a refused workflow document.
    pub details: Option<serde_json::Value>,
    /// Seconds after which trying again may succeed (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
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
    pub code: Code,
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
            tracing::error!(code = %self.code, "{}", self.message);
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                details: self.details,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        let mut error = Self::new(e.code(), e.to_string());
        if let CallError::Shed { retry_after, .. } = &e {
            error.retry_after = Some(retry_after.as_secs().max(1));
        }
        error
    }
}

impl From<deadlift_agent::cluster::ClusterError> for ApiError {
    fn from(e: deadlift_agent::cluster::ClusterError) -> Self {
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
        Self::new(Code::Storage, e.to_string())
    }
}

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> Self {
        match &e {
            WorkflowError::Spec(spec) => Self::new(e.code(), e.to_string())
                .with_details(serde_json::json!({ "errors": spec.field_errors() })),
            WorkflowError::RunFailed(failure) => Self::new(failure.code, failure.message.clone())
                .with_details(serde_json::json!({ "step": failure.step, "kind": failure.kind })),
            _ => Self::new(e.code(), e.to_string()),
        }
    }
}

impl From<KvError> for ApiError {
    fn from(e: KvError) -> Self {
        Self::new(Code::Storage, e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::new(Code::Internal, format!("a background task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_answers_with_its_codes_status_and_a_json_body() {
        let response = ApiError::new(Code::RunNotFound, "no run r1").into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response.headers().get(axum::http::header::CONTENT_TYPE),
            Some(&axum::http::HeaderValue::from_static("application/json"))
        );
    }

    #[test]
    fn call_errors_keep_their_code() {
        let error = ApiError::from(CallError::Timeout {
            limit: std::time::Duration::ZERO,
        });
        assert_eq!(error.code, Code::Timeout);
        assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
