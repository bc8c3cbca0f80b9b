//! The one step executor. A durable run's step, a step of a Deadlift v1 execute and a
//! hook call all run here: the step's condition and input mapping, then its action (a
//! module call with its grant and retry policy, or an event to emit), ending in a
//! [`StepOutcome`] that holds the journal record and the events to commit with it.
//! Callers differ only in what they do with the outcome (journal it now, record the
//! whole run after answering, record the hook call).

use crate::keeping::{Keeping, Kept};
use crate::releases::Releases;
use crate::tapes::Tapes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Value, json};

use super::event::{CloudEvent, DEPTH_EXTENSION, MAX_DEPTH, TO_EXTENSION, TraceParent};
use super::expr::{ExpressionError, Scope};
use super::records::{Failure, StepRecord, StepStatus};
use super::spec::{Action, ErrorKind, RetrySpec, Step};
use crate::clock::now_ms;
use crate::federation::PeerDirectory;
use crate::policy::PolicyHandle;
use deadlift_engine::{
    CallContext, CallError, CancelToken, Code, EmittedEvent, Engine, Grant, LogLine, ModuleId,
};

/// How long a resolved module name is trusted before it is looked up again.
const RESOLVE_TTL: Duration = Duration::from_secs(1);
/// Most module names kept resolved.
const MAX_RESOLVED: usize = 4096;

/// Where a step runs: the run (or call) around it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepScope<'a> {
    pub tenant: &'a str,
    /// The journaled run, when the step belongs to one already (not for a v1 execute
    /// or a hook call, which are recorded after they ran).
    pub run_id: Option<&'a str>,
    pub trace: &'a TraceParent,
    /// How many events caused this run, one after the other.
    pub depth: u64,
    /// The agent's event source (`deadlift://<agent>`).
    pub source: &'a str,
    /// The workflow the step belongs to, if any: its events' source names it.
    pub workflow: Option<&'a str>,
    pub cancel: &'a CancelToken,
    /// Whether the tenant wrote the step's grant (a workflow's), so that it is held to
    /// the operator's policy; the embedder's hook grants are not.
    pub tenant_grant: bool,
}

/// A finished step: its journal record (succeeded, skipped or failed, with the
/// failure) and the events it emitted, which commit together with the record.
#[derive(Debug)]
pub struct StepOutcome {
    pub record: StepRecord,
    pub emitted: Vec<CloudEvent>,
}

impl StepOutcome {
    /// Why the step failed, if it did.
    pub fn failure(&self) -> Option<&Failure> {
        self.record.error.as_ref()
    }
}

/// A step that did not succeed, before it becomes a record.
struct StepFailure {
    failure: Failure,
    attempts: u32,
    attempt_errors: Vec<Failure>,
    module: Option<Served>,
    /// Grant fields the policy narrowed for this step.
    clamped: Vec<&'static str>,
}

impl StepFailure {
    fn config(code: Code, message: String) -> Self {
        Self {
            failure: Failure {
                step: None,
                code,
                kind: Some(ErrorKind::Config),
                message,
            },
            attempts: 1,
            attempt_errors: Vec::new(),
            module: None,
            clamped: Vec::new(),
        }
    }
}

/// The module that served an attempt, and how its release chose it.
#[derive(Debug, Clone, Default)]
struct Served {
    id: String,
    version: Option<String>,
    canary: bool,
}

/// One successful attempt of a module call.
struct Called {
    module: Served,
    output: Value,
    logs: Vec<LogLine>,
    logs_dropped: u64,
    fuel_used: u64,
    emitted: Vec<CloudEvent>,
}

/// Runs steps; shared by every run task, the v1 route and hook calls.
#[derive(Debug)]
pub(crate) struct StepExecutor {
    engine: Engine,
    peers: PeerDirectory,
    policy: PolicyHandle,
    resolved: Mutex<HashMap<(String, String), (ModuleId, Instant)>>,
    /// Records the calls of steps and hooks as tapes.
    tapes: Arc<Tapes>,
    /// Which version serves a bare module name.
    releases: Arc<Releases>,
}

impl StepExecutor {
    pub fn new(
        engine: Engine,
        peers: PeerDirectory,
        policy: PolicyHandle,
        tapes: Arc<Tapes>,
        releases: Arc<Releases>,
    ) -> Self {
        Self {
            engine,
            peers,
            policy,
            resolved: Mutex::new(HashMap::new()),
            tapes,
            releases,
        }
    }

    /// Runs one step to its outcome. `flow_input` is what the step receives from the
    /// flow (the run's input, the previous step's output, or its needs' outputs).
    pub async fn run(
        &self,
        at: StepScope<'_>,
        step: &Step,
        flow_input: Value,
        scope: Scope<'_>,
    ) -> StepOutcome {
        let started = now_ms();
        match self.attempt(at, step, &flow_input, scope, started).await {
            Ok(outcome) => outcome,
            Err(failed) => {
                let mut failure = failed.failure;
                failure.step = Some(step.id.clone());
                StepOutcome {
                    record: StepRecord {
                        id: step.id.clone(),
                        status: StepStatus::Failed,
                        version: failed.module.as_ref().and_then(|m| m.version.clone()),
                        canary: failed.module.as_ref().is_some_and(|m| m.canary),
                        module: failed.module.map(|m| m.id),
                        function: match &step.action {
                            Action::Call { function, .. } => Some(function.clone()),
                            Action::Emit { .. } => None,
                        },
                        fuel_used: None,
                        input: flow_input,
                        output: Value::Null,
                        logs: Vec::new(),
                        logs_dropped: 0,
                        attempts: failed.attempts,
                        attempt_errors: failed.attempt_errors,
                        started_unix_ms: started,
                        finished_unix_ms: now_ms(),
                        error: Some(failure),
                        emitted: Vec::new(),
                        clamped: failed.clamped.into_iter().map(str::to_owned).collect(),
                    },
                    emitted: Vec::new(),
                }
            }
        }
    }

    async fn attempt(
        &self,
        at: StepScope<'_>,
        step: &Step,
        flow_input: &Value,
        scope: Scope<'_>,
        started: i64,
    ) -> Result<StepOutcome, StepFailure> {
        let expression_failed = |error: ExpressionError| StepFailure {
            attempts: 0,
            ..StepFailure::config(error.code(), error.to_string())
        };
        if let Some(condition) = &step.condition
            && !condition
                .condition(scope)
                .await
                .map_err(expression_failed)?
        {
            return Ok(skipped(step, flow_input.clone()));
        }
        let input = match &step.input {
            Some(mapping) => mapping
                .evaluate_off_async(scope)
                .await
                .map_err(expression_failed)?,
            None => flow_input.clone(),
        };
        let record =
            |status, module, output, logs, attempts, attempt_errors, emitted: &[_]| StepRecord {
                id: step.id.clone(),
                status,
                module,
                version: None,
                canary: false,
                function: None,
                fuel_used: None,
                input: input.clone(),
                output,
                logs,
                logs_dropped: 0,
                attempts,
                attempt_errors,
                started_unix_ms: started,
                finished_unix_ms: now_ms(),
                error: None,
                emitted: emitted.iter().map(|e: &CloudEvent| e.id.clone()).collect(),
                clamped: Vec::new(),
            };
        match &step.action {
            Action::Emit {
                event_type,
                data,
                to,
            } => {
                let data = match data {
                    Some(expression) => expression
                        .evaluate_off_async(scope)
                        .await
                        .map_err(expression_failed)?,
                    None => input.clone(),
                };
                if let Some(peer) = to {
                    self.peers
                        .check_serves(peer, at.tenant)
                        .map_err(|message| StepFailure::config(Code::PeerNotFound, message))?;
                    self.peers
                        .check_sends(peer, at.tenant, event_type)
                        .map_err(|message| StepFailure::config(Code::EventNotAccepted, message))?;
                }
                let emitted = EmittedEvent {
                    event_type: event_type.clone(),
                    data,
                };
                let mut event = new_event(at, emitted).map_err(|failure| StepFailure {
                    failure,
                    attempts: 1,
                    attempt_errors: Vec::new(),
                    module: None,
                    clamped: Vec::new(),
                })?;
                if let Some(peer) = to {
                    event
                        .extensions
                        .insert(TO_EXTENSION.into(), Value::String(peer.clone()));
                }
                let emitted = vec![event];
                let output = flow_input.clone();
                let record = record(
                    StepStatus::Succeeded,
                    None,
                    output,
                    Vec::new(),
                    1,
                    Vec::new(),
                    &emitted,
                );
                Ok(StepOutcome { record, emitted })
            }
            Action::Call {
                module,
                function,
                grant,
                retry,
            } => {
                let bytes = serde_json::to_vec(&input).unwrap_or_default();
                // The policy in force now, not when the workflow was applied.
                let (held, clamped) = if at.tenant_grant {
                    self.policy.current().clamp(at.tenant, grant)
                } else {
                    (grant.as_ref().clone(), Vec::new())
                };
                let (called, attempts, attempt_errors) = self
                    .call_with_retries(at, module, function, &held, retry, &bytes)
                    .await
                    .map_err(|mut failed| {
                        failed.clamped.clone_from(&clamped);
                        failed
                    })?;
                let mut record = record(
                    StepStatus::Succeeded,
                    Some(called.module.id),
                    called.output,
                    called.logs,
                    attempts,
                    attempt_errors,
                    &called.emitted,
                );
                record.version = called.module.version;
                record.canary = called.module.canary;
                record.clamped = clamped.into_iter().map(str::to_owned).collect();
                record.logs_dropped = called.logs_dropped;
                record.function = Some(function.clone());
                record.fuel_used = held.fuel.map(|_| called.fuel_used);
                Ok(StepOutcome {
                    record,
                    emitted: called.emitted,
                })
            }
        }
    }

    /// Calls the module until an attempt succeeds, the error is not one the policy
    /// retries, the attempts are spent or the run is cancelled. Returns the successful
    /// attempt, the number of attempts and the errors of the failed ones.
    async fn call_with_retries(
        &self,
        at: StepScope<'_>,
        module: &str,
        function: &str,
        grant: &Grant,
        retry: &RetrySpec,
        input: &[u8],
    ) -> Result<(Called, u32, Vec<Failure>), StepFailure> {
        let mut attempt_errors = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (module_id, error) = match self.call_once(at, module, function, grant, input).await
            {
                Ok(called) => return Ok((called, attempt, attempt_errors)),
                Err(failed) => failed,
            };
            let retryable = error.kind.is_some_and(|k| retry.retry_on.contains(&k));
            if !retryable || attempt >= retry.attempts || at.cancel.is_cancelled() {
                return Err(StepFailure {
                    failure: error,
                    attempts: attempt,
                    attempt_errors,
                    module: module_id,
                    clamped: Vec::new(),
                });
            }
            attempt_errors.push(error);
            let mut delay = retry.delay(attempt + 1);
            if retry.jitter {
                delay = delay.mul_f64(0.5 + super::event::random_fraction() / 2.0);
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt of a module call. A failure carries the module when it was resolved.
    /// A bare name goes through its release: the live version or a canary serves it
    /// (the run's calls all on one side), the outcome counts towards the canary, and a
    /// shadow rollout gets the call's tape to replay.
    async fn call_once(
        &self,
        at: StepScope<'_>,
        module: &str,
        function: &str,
        grant: &Grant,
        input: &[u8],
    ) -> Result<Called, (Option<Served>, Failure)> {
        let call_failure = |error: &CallError| Failure {
            step: None,
            code: error.code(),
            kind: Some(ErrorKind::of(error)),
            message: error.to_string(),
        };
        let routed = self.releases.route(at.tenant, module, at.run_id);
        let id = match &routed {
            Some(routed) => routed.version.module,
            None => self
                .resolve(at.tenant, module)
                .await
                .map_err(|e| (None, call_failure(&e)))?,
        };
        let served = Served {
            id: id.to_string(),
            version: routed.as_ref().and_then(|r| r.version.version.clone()),
            canary: routed.as_ref().is_some_and(|r| r.canary),
        };
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let mut ctx = CallContext::new(at.tenant)
            .with_cancel(at.cancel.clone())
            .with_emit_buffer(buffer.clone());
        if let Some(run_id) = at.run_id {
            ctx = ctx.with_run_id(run_id);
        }
        let keeping = Keeping::begin(
            &self.tapes,
            at.tenant,
            &served.id,
            function,
            routed.as_ref(),
        );
        if let Some(tape) = keeping.tape() {
            ctx = ctx.with_tape(tape.clone());
        }
        let called = self.engine.call(&id, function, input, grant, &ctx).await;
        keeping.end(
            &self.tapes,
            &self.releases,
            Kept {
                tenant: at.tenant,
                routed: routed.as_ref(),
                module_id: served.id.clone(),
                // The module's own name, looked up by the tape writer.
                module_name: None,
                function,
                input,
                grant,
                result: &called,
                duration_us: called.as_ref().map_or(0, |out| {
                    u64::try_from(out.duration.as_micros()).unwrap_or(u64::MAX)
                }),
            },
        );
        let result = self.finish_call(at, served, called, &buffer, &call_failure);
        if let Some(routed) = &routed {
            let failed = result
                .as_ref()
                .err()
                .is_some_and(|(_, _, against)| *against);
            self.releases.observe(at.tenant, routed, failed);
        }
        result.map_err(|(served, failure, _)| (served, failure))
    }

    /// A call's output and emitted events as a step's, or why not, and whether that
    /// counts against the version that served it (to judge a canary by).
    fn finish_call(
        &self,
        at: StepScope<'_>,
        served: Served,
        called: Result<deadlift_engine::CallOutput, CallError>,
        buffer: &Mutex<Vec<EmittedEvent>>,
        call_failure: &dyn Fn(&CallError) -> Failure,
    ) -> Result<Called, (Option<Served>, Failure, bool)> {
        let out = match called {
            Ok(out) => out,
            Err(e) => {
                let against = crate::releases::counts_against_version(&e);
                return Err((Some(served), call_failure(&e), against));
            }
        };
        let output = if out.output.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&out.output) {
                Ok(value) => value,
                Err(e) => {
                    let failure = Failure {
                        step: None,
                        code: Code::OutputNotJson,
                        kind: Some(ErrorKind::Guest),
                        message: format!("the step's output is not JSON: {e}"),
                    };
                    // Output that is not JSON is the version's doing.
                    return Err((Some(served), failure, true));
                }
            }
        };
        let emitted = std::mem::take(&mut *buffer.lock())
            .into_iter()
            .map(|event| new_event(at, event))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|failure| (Some(served.clone()), failure, false))?;
        Ok(Called {
            module: served,
            output,
            logs: out.logs,
            logs_dropped: out.logs_dropped,
            fuel_used: out.fuel_used,
            emitted,
        })
    }

    /// A module reference (`sha256:…`, `name` or `name@version`) as a module id,
    /// trusted for a moment so that busy workflows do not look names up every call.
    async fn resolve(&self, tenant: &str, reference: &str) -> Result<ModuleId, CallError> {
        let not_found = || CallError::ModuleNotFound {
            module: reference.to_owned(),
        };
        if reference.starts_with("sha256:") {
            return reference.parse().map_err(|_| not_found());
        }
        let key = (tenant.to_owned(), reference.to_owned());
        if let Some((id, at)) = self.resolved.lock().get(&key)
            && at.elapsed() < RESOLVE_TTL
        {
            return Ok(*id);
        }
        let registry = self.engine.registry().clone();
        let (owner, name) = key.clone();
        let info = tokio::task::spawn_blocking(move || registry.resolve(&owner, &name))
            .await
            .map_err(|e| CallError::Internal {
                message: e.to_string(),
            })?
            .map_err(|_| not_found())?;
        let mut resolved = self.resolved.lock();
        if resolved.len() >= MAX_RESOLVED {
            resolved.clear();
        }
        resolved.insert(key, (info.id, Instant::now()));
        Ok(info.id)
    }
}

/// An event a step emits: in the run's trace, one level deeper, refused when the chain
/// of events causing runs is already at its limit (it would loop).
fn new_event(at: StepScope<'_>, emitted: EmittedEvent) -> Result<CloudEvent, Failure> {
    let depth = at.depth + 1;
    if depth > MAX_DEPTH {
        return Err(Failure {
            step: None,
            code: Code::EventChainTooDeep,
            kind: Some(ErrorKind::Config),
            message: format!(
                "this run is the end of a chain of {MAX_DEPTH} events causing runs; emitting more would loop"
            ),
        });
    }
    // Built here, when an event is emitted, not for every step.
    let source = match at.workflow {
        Some(workflow) => format!("{}/workflows/{workflow}", at.source),
        None => at.source.to_owned(),
    };
    let mut event = CloudEvent::new(emitted.event_type, source, emitted.data);
    event.extensions.insert(
        "traceparent".into(),
        Value::String(at.trace.child().to_string()),
    );
    event
        .extensions
        .insert(DEPTH_EXTENSION.into(), json!(depth));
    Ok(event)
}

/// The outcome of a step whose condition was false (or whose need was skipped).
pub(crate) fn skipped(step: &Step, output: Value) -> StepOutcome {
    let now = now_ms();
    StepOutcome {
        record: StepRecord {
            id: step.id.clone(),
            status: StepStatus::Skipped,
            module: None,
            version: None,
            canary: false,
            function: None,
            fuel_used: None,
            input: Value::Null,
            output,
            logs: Vec::new(),
            logs_dropped: 0,
            attempts: 0,
            attempt_errors: Vec::new(),
            started_unix_ms: now,
            finished_unix_ms: now,
            error: None,
            emitted: Vec::new(),
            clamped: Vec::new(),
        },
        emitted: Vec::new(),
    }
}
