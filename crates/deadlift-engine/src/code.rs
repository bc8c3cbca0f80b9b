//! The stable error codes of every layer: one [`Code`] enum that knows its string and
//! its HTTP status. It lives at the bottom of the crate graph (here, in the engine) so
//! that the engine's, the agent's and the server's errors all answer with the same
//! type, and a code that does not exist cannot be written: a typo is a compile error,
//! not a silent 500.
//!
//! The strings are part of the API contract: clients match on them, and runs store them
//! in the journal. Never rename one; add a new code instead.

use std::fmt;
use std::str::FromStr;

pub use http::StatusCode;

macro_rules! codes {
    ($($variant:ident = $text:literal => $status:ident,)*) => {
        /// A stable, machine-readable error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $($variant,)*
        }

        impl Code {
            /// Every code, for tests and documentation.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The code as clients see it, e.g. `module_not_found`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $text,)*
                }
            }

            /// The HTTP status an error with this code is answered with.
            pub const fn status(self) -> StatusCode {
                match self {
                    $(Code::$variant => StatusCode::$status,)*
                }
            }
        }
    };
}

codes! {
    // The request itself is malformed.
    BadRequest = "bad_request" => BAD_REQUEST,
    InvalidJson = "invalid_json" => BAD_REQUEST,
    MissingField = "missing_field" => BAD_REQUEST,
    NotMultipart = "not_multipart" => BAD_REQUEST,
    InvalidInput = "invalid_input" => BAD_REQUEST,
    ModuleInvalid = "module_invalid" => BAD_REQUEST,
    ModuleImportInvalid = "module_import_invalid" => BAD_REQUEST,
    ModuleNameInvalid = "module_name_invalid" => BAD_REQUEST,
    ModuleIdInvalid = "module_id_invalid" => BAD_REQUEST,
    ModuleMissingMain = "module_missing_main" => BAD_REQUEST,
    GrantInvalid = "grant_invalid" => BAD_REQUEST,
    TenantInvalid = "tenant_invalid" => BAD_REQUEST,
    SubjectUnknown = "subject_unknown" => BAD_REQUEST,
    PipelineEmpty = "pipeline_empty" => BAD_REQUEST,
    WorkflowInvalid = "workflow_invalid" => BAD_REQUEST,
    EventInvalid = "event_invalid" => BAD_REQUEST,
    PeerInvalid = "peer_invalid" => BAD_REQUEST,
    BindingInvalid = "binding_invalid" => BAD_REQUEST,
    RolloutInvalid = "rollout_invalid" => BAD_REQUEST,
    // Who is asking is unknown or unproven.
    Unauthorized = "unauthorized" => UNAUTHORIZED,
    PeerUnknown = "peer_unknown" => UNAUTHORIZED,
    SignatureInvalid = "signature_invalid" => UNAUTHORIZED,
    SignatureExpired = "signature_expired" => UNAUTHORIZED,
    // Known, but not allowed.
    Forbidden = "forbidden" => FORBIDDEN,
    EventNotAccepted = "event_not_accepted" => FORBIDDEN,
    // A stored grant (a manifest) asks for more than the operator's policy allows.
    GrantOverPolicy = "grant_over_policy" => FORBIDDEN,
    // What was named does not exist.
    RouteNotFound = "route_not_found" => NOT_FOUND,
    ModuleNotFound = "module_not_found" => NOT_FOUND,
    FunctionNotFound = "function_not_found" => NOT_FOUND,
    TenantNotFound = "tenant_not_found" => NOT_FOUND,
    TokenNotFound = "token_not_found" => NOT_FOUND,
    KeyNotFound = "key_not_found" => NOT_FOUND,
    WorkflowNotFound = "workflow_not_found" => NOT_FOUND,
    RunNotFound = "run_not_found" => NOT_FOUND,
    PeerNotFound = "peer_not_found" => NOT_FOUND,
    HookNotFound = "hook_not_found" => NOT_FOUND,
    HookNotBound = "hook_not_bound" => NOT_FOUND,
    DeadLetterNotFound = "dead_letter_not_found" => NOT_FOUND,
    MethodNotAllowed = "method_not_allowed" => METHOD_NOT_ALLOWED,
    // The request conflicts with the current state.
    ModuleConflict = "module_conflict" => CONFLICT,
    TenantExists = "tenant_exists" => CONFLICT,
    ModuleInUse = "module_in_use" => CONFLICT,
    RolloutConflict = "rollout_conflict" => CONFLICT,
    ModuleIncompatible = "module_incompatible" => CONFLICT,
    RunNotRetryable = "run_not_retryable" => CONFLICT,
    RunNotOpen = "run_not_open" => CONFLICT,
    // A run another agent of the cluster ran: it is retried or cancelled there.
    RunElsewhere = "run_elsewhere" => CONFLICT,
    DeliveryNotDead = "delivery_not_dead" => CONFLICT,
    PayloadTooLarge = "payload_too_large" => PAYLOAD_TOO_LARGE,
    InputTooLarge = "input_too_large" => PAYLOAD_TOO_LARGE,
    ModuleTooLarge = "module_too_large" => PAYLOAD_TOO_LARGE,
    UnsupportedMediaType = "unsupported_media_type" => UNSUPPORTED_MEDIA_TYPE,
    // The plug-in (or the run around it) failed: the request was fine, its effect not.
    Trap = "trap" => UNPROCESSABLE_ENTITY,
    GuestError = "guest_error" => UNPROCESSABLE_ENTITY,
    GuestExitCode = "guest_exit_code" => UNPROCESSABLE_ENTITY,
    Timeout = "timeout" => UNPROCESSABLE_ENTITY,
    Cancelled = "cancelled" => UNPROCESSABLE_ENTITY,
    FuelExhausted = "fuel_exhausted" => UNPROCESSABLE_ENTITY,
    MemoryLimit = "memory_limit" => UNPROCESSABLE_ENTITY,
    OutputTooLarge = "output_too_large" => UNPROCESSABLE_ENTITY,
    HostFunctionDenied = "host_function_denied" => UNPROCESSABLE_ENTITY,
    HostFunctionUnknown = "host_function_unknown" => UNPROCESSABLE_ENTITY,
    HostFunctionFailed = "host_function_failed" => UNPROCESSABLE_ENTITY,
    ReplayDiverged = "replay_diverged" => UNPROCESSABLE_ENTITY,
    ImportDenied = "import_denied" => UNPROCESSABLE_ENTITY,
    FunctionSignature = "function_signature" => UNPROCESSABLE_ENTITY,
    LinkFailed = "link_failed" => UNPROCESSABLE_ENTITY,
    OutputNotJson = "output_not_json" => UNPROCESSABLE_ENTITY,
    HttpDenied = "http_denied" => UNPROCESSABLE_ENTITY,
    ExpressionFailed = "expression_failed" => UNPROCESSABLE_ENTITY,
    ExpressionBudgetExceeded = "expression_budget_exceeded" => UNPROCESSABLE_ENTITY,
    EventChainTooDeep = "event_chain_too_deep" => UNPROCESSABLE_ENTITY,
    RunFailed = "run_failed" => UNPROCESSABLE_ENTITY,
    // The agent cannot take the work now; trying later may succeed.
    Overloaded = "overloaded" => SERVICE_UNAVAILABLE,
    TenantOverloaded = "tenant_overloaded" => TOO_MANY_REQUESTS,
    ShuttingDown = "shutting_down" => SERVICE_UNAVAILABLE,
    ClusterUnavailable = "cluster_unavailable" => SERVICE_UNAVAILABLE,
    // Our fault, not the caller's.
    Storage = "storage" => INTERNAL_SERVER_ERROR,
    Internal = "internal" => INTERNAL_SERVER_ERROR,
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code `{0}`")]
pub struct UnknownCode(pub String);

impl FromStr for Code {
    type Err = UnknownCode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Code::ALL
            .iter()
            .copied()
            .find(|code| code.as_str() == text)
            .ok_or_else(|| UnknownCode(text.to_owned()))
    }
}

impl serde::Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Code {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(Code::ALL.iter().map(|code| code.as_str())))
            .description(Some("A stable, machine-readable error code."))
            .into()
    }
}

impl utoipa::ToSchema for Code {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_stable_unique_string_and_an_error_status() {
        let mut seen = std::collections::HashSet::new();
        for &code in Code::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} is used twice");
            assert!(
                !text.is_empty() && text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{text} is not snake_case"
            );
            assert_eq!(text.parse::<Code>(), Ok(code));
            assert_eq!(serde_json::to_value(code).ok(), Some(text.into()));
            let status = code.status();
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{text} -> {status}"
            );
        }
        assert_eq!(
            "no_such_code".parse::<Code>(),
            Err(UnknownCode("no_such_code".into()))
        );
    }

    #[test]
    fn only_our_own_failures_are_server_errors() {
        for &code in Code::ALL {
            let ours = matches!(
                code,
                Code::Internal
                    | Code::Storage
                    | Code::Overloaded
                    | Code::ShuttingDown
                    | Code::ClusterUnavailable
            );
            assert_eq!(code.status().is_server_error(), ours, "{code}");
        }
    }
}
