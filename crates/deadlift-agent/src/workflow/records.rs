//! The records of the workflow journal: what the API shows (runs, steps, dead letters,
//! workflow versions), what the runner works with (tickets) and what callers hand the
//! journal (new runs, filters, retention). Plain data: no storage here.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::event::{CloudEvent, TraceParent};
use super::spec::{ErrorKind, WorkflowSpec};
use deadlift_engine::{Code, LogLine};

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    Event,
    Http,
    Schedule,
    /// A Deadlift v1 `workflows/{id}/execute` call.
    V1,
    /// A call of an extension point by the embedding application.
    Hook,
}

impl TriggerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Http => "http",
            Self::Schedule => "schedule",
            Self::V1 => "v1",
            Self::Hook => "hook",
        }
    }

    pub fn parse(text: &str) -> Self {
        match text {
            "http" => Self::Http,
            "schedule" => Self::Schedule,
            "v1" => Self::V1,
            "hook" => Self::Hook,
            _ => Self::Event,
        }
    }
}

/// Why a step or run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Failure {
    /// The step that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// A stable code: an engine call error code, or `expression_failed`,
    /// `output_not_json`, `event_chain_too_deep`, `cancelled`.
    pub code: Code,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Succeeded,
    Skipped,
    Failed,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
        }
    }
}

/// One journaled step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepRecord {
    pub id: String,
    pub status: StepStatus,
    /// The module actually called (`sha256:...`), for call steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The version of the module's name that served the step, when the step calls a
    /// bare name (its release chose the version) and the version has a label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether a canary of the module's name served the step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
    /// The exported function called, for call steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Fuel the successful call used, when its grant metered fuel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_used: Option<u64>,
    pub input: Value,
    pub output: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogLine>,
    /// Log lines dropped over the step's caps (the last of `logs` says so too).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub logs_dropped: u64,
    pub attempts: u32,
    /// The errors of failed attempts, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_errors: Vec<Failure>,
    pub started_unix_ms: i64,
    pub finished_unix_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// Ids of the events this step emitted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emitted: Vec<String>,
    /// Grant fields the operator's policy narrowed for this step (a policy tightened
    /// after the workflow was applied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clamped: Vec<String>,
}

/// A run as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunSummary {
    pub id: String,
    pub workflow: String,
    pub workflow_version: i64,
    pub status: RunStatus,
    pub trigger: TriggerKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub trace_id: String,
    pub created_unix_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_unix_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// Position in the agent's run order; pass as `before` to page.
    pub seq: i64,
}

/// A run with its input, output, event and steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Run {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub input: Value,
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<CloudEvent>,
    pub traceparent: String,
    pub steps: Vec<StepRecord>,
}

/// A dead letter: a failed run whose event (or request) needs attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub id: i64,
    pub run_id: String,
    pub workflow: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub error: Failure,
    pub created_unix_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_unix_ms: Option<i64>,
}

/// A stored workflow version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkflowVersion {
    pub name: String,
    pub version: i64,
    pub spec: WorkflowSpec,
    pub created_unix_ms: i64,
}

/// Everything the runner needs to execute (or resume) a run.
#[derive(Debug, Clone)]
pub struct RunTicket {
    pub run_id: String,
    pub run_seq: i64,
    /// Which execution of the run this is: 0, then one more at each retry. The journal
    /// takes steps and the end of the run only from its current execution.
    pub execution: i64,
    pub tenant: String,
    pub workflow: String,
    pub version: i64,
    pub input: Value,
    pub event: Option<Value>,
    pub trace: TraceParent,
    pub depth: u64,
    /// Steps already journaled (succeeded or skipped), when resuming.
    pub done: Vec<StepRecord>,
    /// Whether the run was already marked running.
    pub started: bool,
    /// Set once a step of this execution was handed to the journal.
    pub journaled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The cluster's lease on the run (cluster mode): its steps are journaled there too.
    pub lease: Option<std::sync::Arc<dyn super::lease::RunLease>>,
}

/// A run to create.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub tenant: String,
    pub workflow: String,
    pub version: i64,
    pub trigger: TriggerKind,
    pub input: Value,
    pub event: Option<(i64, CloudEvent)>,
    pub trace: TraceParent,
}

/// Filters for listing runs.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunFilter {
    pub workflow: Option<String>,
    pub status: Option<RunStatus>,
    /// Only runs created at or after this time (Unix ms).
    pub since_unix_ms: Option<i64>,
    /// Only runs created before this time (Unix ms).
    pub until_unix_ms: Option<i64>,
    pub trace_id: Option<String>,
    pub event_id: Option<String>,
    /// Only runs older than this `seq` (the previous page's `next`).
    pub before: Option<i64>,
    /// Only runs newer than this `seq`.
    pub after: Option<i64>,
    /// At most this many (default 50, at most 500).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// How much history to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Finished runs older than this are deleted.
    pub max_age_ms: Option<i64>,
    /// At most this many finished runs are kept per tenant (the newest).
    pub max_runs_per_tenant: Option<u64>,
    /// Event ids are remembered (for deduplication) at least this long.
    pub dedupe_window_ms: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age_ms: Some(7 * 24 * 3600 * 1000),
            max_runs_per_tenant: Some(100_000),
            dedupe_window_ms: 24 * 3600 * 1000,
        }
    }
}

/// How a run ends, journaled with its last step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finish {
    pub status: RunStatus,
    pub output: Option<Value>,
    pub error: Option<Failure>,
    /// Whether a failure goes to the dead letters (not when the caller saw it).
    pub dead_letter: bool,
}

/// What ingesting one event did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ingested {
    pub id: String,
    /// The id was seen before: nothing new happened.
    pub duplicate: bool,
    /// Runs this event started.
    pub runs: Vec<String>,
    /// Stored by the cluster's stream: whichever agent pulls it starts its runs, so
    /// `runs` is empty here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clustered: bool,
}

/// A change to a run, for watchers (`runs tail`).
#[derive(Debug, Clone)]
pub struct RunUpdate {
    pub tenant: String,
    pub run: RunSummary,
    /// Another agent of the cluster ran it (this agent stored it from the history).
    pub imported: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
