//! The typed errors of a call. Every way a call can fail is one variant with a stable
//! machine-readable code (`CallError::code`), so that the HTTP layer can map codes to
//! statuses in one table and users can match on them.

use std::time::Duration;

use crate::code::Code;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("module {module} is not registered for this tenant")]
    ModuleNotFound { module: String },
    #[error("function `{function}` is not exported by the module")]
    FunctionNotFound { function: String },
    #[error(
        "export `{function}` has type {signature}; an Extism export takes no parameters and returns nothing or an i32"
    )]
    FunctionSignature { function: String, signature: String },
    #[error("the module imports host function `{name}`, which its grant does not allow")]
    HostFunctionDenied { name: String },
    #[error("the module imports host function `{name}`, which this agent does not offer")]
    HostFunctionUnknown { name: String },
    #[error("the module imports `{module}::{name}`: {reason}")]
    ImportDenied {
        module: String,
        name: String,
        reason: String,
    },
    #[error("the module could not be instantiated: {message}")]
    Link { message: String },
    #[error("input is {size} bytes, over the limit of {limit}")]
    InputTooLarge { size: u64, limit: u64 },
    #[error("output is {size} bytes, over the limit of {limit}")]
    OutputTooLarge { size: u64, limit: u64 },
    #[error("the call exceeded its time limit of {} ms", limit.as_millis())]
    Timeout { limit: Duration },
    #[error("the call was cancelled")]
    Cancelled,
    #[error("the call ran out of fuel (budget {budget})")]
    FuelExhausted { budget: u64 },
    #[error("the instance exceeded its memory budget of {limit_bytes} bytes")]
    MemoryLimit { limit_bytes: u64 },
    #[error("wasm trap: {message}")]
    Trap { message: String },
    #[error("guest error (code {code}): {message}")]
    Guest { code: i32, message: String },
    #[error("guest returned non-zero exit code {code}")]
    ExitCode { code: i32 },
    #[error("host function `{name}` failed: {message}")]
    HostFunction { name: String, message: String },
    #[error("{reason}")]
    HttpDenied { url: String, reason: String },
    #[error("the grant is invalid: {reason}")]
    GrantInvalid { reason: String },
    #[error("the engine is at capacity: {reason}")]
    Overloaded { reason: String },
    /// The call was not run, to keep its tenant from delaying others: try again after
    /// `retry_after`.
    #[error("call shed: {reason}; retry after {} s", retry_after.as_secs())]
    Shed {
        reason: String,
        retry_after: std::time::Duration,
    },
    #[error("internal engine error: {message}")]
    Internal { message: String },
    /// Replaying a tape, the guest made a host call the tape cannot answer; it was not
    /// run.
    #[error(
        "host call {index} diverged from the tape: the guest called `{function}`, the tape has {expected}"
    )]
    Diverged {
        index: usize,
        function: String,
        expected: String,
    },
}

impl CallError {
    /// A stable, machine-readable code for this kind of failure.
    pub fn code(&self) -> Code {
        match self {
            Self::ModuleNotFound { .. } => Code::ModuleNotFound,
            Self::FunctionNotFound { .. } => Code::FunctionNotFound,
            Self::FunctionSignature { .. } => Code::FunctionSignature,
            Self::HostFunctionDenied { .. } => Code::HostFunctionDenied,
            Self::HostFunctionUnknown { .. } => Code::HostFunctionUnknown,
            Self::ImportDenied { .. } => Code::ImportDenied,
            Self::Link { .. } => Code::LinkFailed,
            Self::InputTooLarge { .. } => Code::InputTooLarge,
            Self::OutputTooLarge { .. } => Code::OutputTooLarge,
            Self::Timeout { .. } => Code::Timeout,
            Self::Cancelled => Code::Cancelled,
            Self::FuelExhausted { .. } => Code::FuelExhausted,
            Self::MemoryLimit { .. } => Code::MemoryLimit,
            Self::Trap { .. } => Code::Trap,
            Self::Guest { .. } => Code::GuestError,
            Self::ExitCode { .. } => Code::GuestExitCode,
            Self::HostFunction { .. } => Code::HostFunctionFailed,
            Self::HttpDenied { .. } => Code::HttpDenied,
            Self::GrantInvalid { .. } => Code::GrantInvalid,
            Self::Overloaded { .. } => Code::Overloaded,
            Self::Shed { .. } => Code::TenantOverloaded,
            Self::Internal { .. } => Code::Internal,
            Self::Diverged { .. } => Code::ReplayDiverged,
        }
    }

    /// Whether the instance that produced this error may hold broken state and must be
    /// discarded rather than reused.
    pub fn poisons_instance(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::Cancelled
                | Self::FuelExhausted { .. }
                | Self::MemoryLimit { .. }
                | Self::Trap { .. }
                | Self::HostFunction { .. }
                | Self::Internal { .. }
                | Self::Diverged { .. }
        )
    }
}
