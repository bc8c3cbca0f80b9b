//! Executes runs: takes tickets from the journal writer (new, requeued or resumed
//! runs), walks the workflow's steps as a pipeline or a graph, calls the engine with
//! each step's grant and retry policy, and journals every finished step before going
//! on. A run interrupted by a crash is resumed after its last journaled step.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::event::{CloudEvent, DEPTH_EXTENSION, MAX_DEPTH, random_fraction};
use super::expr::Scope;
use super::journal::{self, Failure, RunStatus, RunSummary, RunTicket, StepRecord, StepStatus};
use super::spec::{Action, ErrorKind, Step, Workflow};
use super::writer::{Command, Finish, Outlets};
use crate::clock::now_ms;
use crate::store::{Database, DbError};
use deadlift_engine::Code;
use deadlift_engine::engine::Engine;
use deadlift_engine::error::CallError;
use deadlift_engine::host::{CallContext, CancelToken, EmittedEvent};
use deadlift_engine::registry::ModuleId;

/// How long a resolved module name is trusted before it is looked up again.
const RESOLVE_TTL: Duration = Duration::from_secs(1);
/// Most finished runs waiting to be recorded (see `execute_now`).
const MAX_UNRECORDED: usize = 4096;
/// How long a run's first step may take before the run is marked running on its own.
const MARK_RUNNING_AFTER: Duration = Duration::from_millis(10);
/// Most compiled workflow versions kept in memory.
const MAX_CACHED_WORKFLOWS: usize = 1024;

/// The parts of the runtime the runner uses; shared by every run task.
#[derive(Debug)]
pub(crate) struct Runner {
    pub db: Database,
    pub engine: Engine,
    pub commands: mpsc::UnboundedSender<Command>,
    pub outlets: Outlets,
    /// The URI runs use as the source of the events they emit.
    pub source: String,
    workflows: Mutex<HashMap<(String, String, i64), Arc<Workflow>>>,
    modules: Mutex<HashMap<(String, String), (ModuleId, Instant)>>,
    /// Cancel tokens of the runs executing now.
    running: Mutex<HashMap<String, CancelToken>>,
    /// Bounds the finished runs handed to the writer but not yet committed.
    unrecorded: Arc<Semaphore>,
}

/// The failure of a step, before it is journaled.
struct StepFailure {
    failure: Failure,
    attempts: u32,
    attempt_errors: Vec<Failure>,
    module: Option<String>,
}

/// A finished step, ready to journal.
struct StepDone {
    record: StepRecord,
    emitted: Vec<CloudEvent>,
}

impl Runner {
    pub fn new(
        db: Database,
        engine: Engine,
        commands: mpsc::UnboundedSender<Command>,
        outlets: Outlets,
        source: String,
    ) -> Self {
        Self {
            db,
            engine,
            commands,
            outlets,
            source,
            workflows: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            unrecorded: Arc::new(Semaphore::new(MAX_UNRECORDED)),
        }
    }

    /// Receives tickets and runs them, at most `concurrency` at a time.
    pub async fn dispatch(
        self: Arc<Self>,
        mut tickets: mpsc::UnboundedReceiver<RunTicket>,
        concurrency: usize,
    ) {
        // Runs are owned here: aborting the dispatcher (at shutdown) aborts them, and
        // they resume from the journal at the next start.
        let mut running = tokio::task::JoinSet::new();
        while let Some(ticket) = tickets.recv().await {
            while running.len() >= concurrency.max(1) {
                running.join_next().await;
            }
            while running.try_join_next().is_some() {}
            let runner = self.clone();
            running.spawn(async move { runner.execute(ticket).await });
        }
    }

    /// Cancels a run: stops it if it is executing, and makes it stop before its first
    /// step if it is still waiting in the queue. (Call after the journal has marked the
    /// run cancelled.)
    pub fn cancel(&self, run_id: &str) {
        let mut running = self.running.lock();
        running.entry(run_id.to_owned()).or_default().cancel();
    }

    /// The compiled workflow version, from memory or the database.
    pub async fn workflow(
        &self,
        tenant: &str,
        name: &str,
        version: i64,
    ) -> Result<Arc<Workflow>, Failure> {
        let key = (tenant.to_owned(), name.to_owned(), version);
        if let Some(found) = self.cache().get(&key) {
            return Ok(found.clone());
        }
        let db = self.db.clone();
        let (owner, wanted) = (key.0.clone(), key.1.clone());
        let stored = tokio::task::spawn_blocking(move || {
            journal::workflow_version(&db.read(), &owner, &wanted, version)
        })
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| internal(e.to_string()))?
        .ok_or_else(|| Failure {
            step: None,
            code: Code::WorkflowNotFound,
            kind: Some(ErrorKind::Config),
            message: format!("workflow {name} version {version} is not stored"),
        })?;
        let workflow = Workflow::compile(stored.spec, None).map_err(|e| Failure {
            step: None,
            code: Code::WorkflowInvalid,
            kind: Some(ErrorKind::Config),
            message: e.to_string(),
        })?;
        let workflow = Arc::new(workflow);
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED_WORKFLOWS {
            cache.clear();
        }
        cache.insert(key, workflow.clone());
        Ok(workflow)
    }

    fn cache(&self) -> parking_lot::MutexGuard<'_, HashMap<(String, String, i64), Arc<Workflow>>> {
        self.workflows.lock()
    }

    async fn resolve(&self, tenant: &str, reference: &str) -> Result<ModuleId, CallError> {
        if let Some(hex) = reference.strip_prefix("sha256:") {
            return format!("sha256:{hex}")
                .parse()
                .map_err(|_| CallError::ModuleNotFound {
                    module: reference.to_owned(),
                });
        }
        let key = (tenant.to_owned(), reference.to_owned());
        {
            let modules = self.modules.lock();
            if let Some((id, at)) = modules.get(&key)
                && at.elapsed() < RESOLVE_TTL
            {
                return Ok(*id);
            }
        }
        let registry = self.engine.registry().clone();
        let (t, r) = key.clone();
        let info = tokio::task::spawn_blocking(move || registry.resolve(&t, &r))
            .await
            .map_err(|e| CallError::Internal {
                message: e.to_string(),
            })?
            .map_err(|_| CallError::ModuleNotFound {
                module: reference.to_owned(),
            })?;
        let mut modules = self.modules.lock();
        if modules.len() > 4096 {
            modules.clear();
        }
        modules.insert(key, (info.id, Instant::now()));
        Ok(info.id)
    }

    /// Runs (or resumes) one durable run to its end, journaling as it goes.
    pub async fn execute(self: &Arc<Self>, ticket: RunTicket) {
        let ticket = Arc::new(ticket);
        // A run cancelled while it was queued finds its token already cancelled.
        let cancel = self
            .running
            .lock()
            .entry(ticket.run_id.clone())
            .or_default()
            .clone();
        if cancel.is_cancelled() {
            self.running.lock().remove(&ticket.run_id);
            return;
        }
        if !ticket.started {
            // A run whose first step is quick is marked running together with that
            // step's record (one commit, one fsync, fewer); a slower one is marked
            // running on its own after a moment, so that watchers see it.
            let (commands, run_seq) = (self.commands.clone(), ticket.run_seq);
            let journaled = ticket.journaled.clone();
            tokio::spawn(async move {
                tokio::time::sleep(MARK_RUNNING_AFTER).await;
                if !journaled.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = commands.send(Command::Running { run_seq });
                }
            });
        }
        let result = match self
            .workflow(&ticket.tenant, &ticket.workflow, ticket.version)
            .await
        {
            Ok(workflow) if workflow.graph => self.run_graph(&ticket, &workflow, &cancel).await,
            Ok(workflow) => self.run_pipeline(&ticket, &workflow, &cancel).await,
            Err(failure) => self.journal_finish(&ticket, failed(failure, true)).await,
        };
        if let Err(error) = result {
            // The journal is unreachable (shutting down, or the disk failed): the run
            // stays open in the database and is resumed at the next start.
            tracing::warn!(run = %ticket.run_id, %error, "run stopped without finishing");
        }
        self.running.lock().remove(&ticket.run_id);
    }

    async fn run_pipeline(
        &self,
        ticket: &Arc<RunTicket>,
        workflow: &Workflow,
        cancel: &CancelToken,
    ) -> Result<(), DbError> {
        let mut outputs = step_outputs(&ticket.done);
        let start = ticket.done.len();
        let mut current = ticket
            .done
            .last()
            .map_or_else(|| ticket.input.clone(), |last| last.output.clone());
        if start > 0 && (start == workflow.steps.len() || current.is_null()) {
            // Crashed after the last step's journal but before the run's end was.
            let finish = succeeded(current);
            return self.journal_finish(ticket, finish).await;
        }
        for (position, step) in workflow.steps.iter().enumerate().skip(start) {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let event = ticket.event.as_ref().unwrap_or(&Value::Null);
            let scope = Scope {
                event,
                input: &ticket.input,
                steps: &outputs,
            };
            match self
                .run_step(ticket, step, current.clone(), scope, cancel)
                .await
            {
                Ok(done) => {
                    current = done.record.output.clone();
                    let last = position + 1 == workflow.steps.len();
                    let ends =
                        last || (current.is_null() && done.record.status == StepStatus::Succeeded);
                    add_output(&mut outputs, &done.record);
                    let finish = ends.then(|| succeeded(current.clone()));
                    self.journal(ticket, position, done, finish).await?;
                    if ends {
                        return Ok(());
                    }
                }
                Err(failure) => {
                    let (record, run_failure) = failure_record(step, current, failure);
                    let finish = Some(failed(run_failure, true));
                    let done = StepDone {
                        record,
                        emitted: Vec::new(),
                    };
                    return self.journal(ticket, position, done, finish).await;
                }
            }
        }
        Ok(())
    }

    async fn run_graph(
        self: &Arc<Self>,
        ticket: &Arc<RunTicket>,
        workflow: &Arc<Workflow>,
        cancel: &CancelToken,
    ) -> Result<(), DbError> {
        let count = workflow.steps.len();
        let mut outputs = step_outputs(&ticket.done);
        let mut status: Vec<Option<StepStatus>> = vec![None; count];
        let mut values: Vec<Value> = vec![Value::Null; count];
        for record in &ticket.done {
            if let Some(index) = workflow.steps.iter().position(|s| s.id == record.id) {
                status[index] = Some(record.status);
                values[index] = record.output.clone();
            }
        }
        let mut journaled = ticket.done.len();
        let mut failure: Option<Failure> = None;
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let ready: Vec<usize> = (0..count)
                .filter(|&i| status[i].is_none())
                .filter(|&i| workflow.steps[i].needs.iter().all(|&n| status[n].is_some()))
                .collect();
            if ready.is_empty() || failure.is_some() {
                break;
            }
            // Ready steps run concurrently; each is journaled as it finishes.
            let mut running = tokio::task::JoinSet::new();
            for index in ready {
                let step = &workflow.steps[index];
                let skip_for_need = step
                    .needs
                    .iter()
                    .any(|&n| status[n] == Some(StepStatus::Skipped));
                let input = match step.needs.as_slice() {
                    [] => ticket.input.clone(),
                    [one] => values[*one].clone(),
                    many => Value::Object(
                        many.iter()
                            .map(|&n| (workflow.steps[n].id.clone(), values[n].clone()))
                            .collect(),
                    ),
                };
                if skip_for_need {
                    let record = skipped(step, Value::Null);
                    running.spawn(async move {
                        (
                            index,
                            Ok(StepDone {
                                record,
                                emitted: Vec::new(),
                            }),
                            Value::Null,
                        )
                    });
                    continue;
                }
                let (runner, ticket, workflow, cancel, outputs) = (
                    self.clone(),
                    ticket.clone(),
                    workflow.clone(),
                    cancel.clone(),
                    outputs.clone(),
                );
                running.spawn(async move {
                    let step = &workflow.steps[index];
                    let event = ticket.event.clone().unwrap_or(Value::Null);
                    let scope = Scope {
                        event: &event,
                        input: &ticket.input,
                        steps: &outputs,
                    };
                    let result = runner
                        .run_step(&ticket, step, input.clone(), scope, &cancel)
                        .await;
                    (index, result, input)
                });
            }
            while let Some(joined) = running.join_next().await {
                let Ok((index, result, input)) = joined else {
                    failure = Some(internal("a step task stopped".into()));
                    continue;
                };
                let step = &workflow.steps[index];
                let (done, step_failure) = match result {
                    Ok(done) => (done, None),
                    Err(f) => {
                        let (record, run_failure) = failure_record(step, input, f);
                        (
                            StepDone {
                                record,
                                emitted: Vec::new(),
                            },
                            Some(run_failure),
                        )
                    }
                };
                status[index] = Some(done.record.status);
                values[index] = done.record.output.clone();
                add_output(&mut outputs, &done.record);
                journaled += 1;
                let finish = match (&step_failure, &failure) {
                    (Some(f), None) | (_, Some(f)) if running.is_empty() => {
                        Some(failed(f.clone(), true))
                    }
                    (None, None) if journaled == count => {
                        Some(succeeded(graph_output(workflow, &values)))
                    }
                    _ => None,
                };
                if failure.is_none() {
                    failure = step_failure;
                }
                self.journal(ticket, index, done, finish).await?;
            }
        }
        if journaled == count && failure.is_none() && ticket.done.len() == count {
            // Resumed after every step was journaled but not the run's end.
            return self
                .journal_finish(ticket, succeeded(graph_output(workflow, &values)))
                .await;
        }
        Ok(())
    }

    /// Runs one step (its condition, input mapping and action, with retries).
    async fn run_step(
        &self,
        ticket: &RunTicket,
        step: &Step,
        flow_input: Value,
        scope: Scope<'_>,
        cancel: &CancelToken,
    ) -> Result<StepDone, StepFailure> {
        let started = now_ms();
        let config_failure = |message: String| StepFailure {
            failure: Failure {
                step: Some(step.id.clone()),
                code: Code::ExpressionFailed,
                kind: Some(ErrorKind::Config),
                message,
            },
            attempts: 0,
            attempt_errors: Vec::new(),
            module: None,
        };
        if let Some(condition) = &step.condition
            && !condition.condition(scope).map_err(config_failure)?
        {
            return Ok(StepDone {
                record: skipped(step, flow_input),
                emitted: Vec::new(),
            });
        }
        let input = match &step.input {
            Some(mapping) => mapping.evaluate(scope).map_err(config_failure)?,
            None => flow_input.clone(),
        };
        match &step.action {
            Action::Emit {
                event_type,
                data,
                to,
            } => {
                let data = match data {
                    Some(expression) => expression.evaluate(scope).map_err(config_failure)?,
                    None => input.clone(),
                };
                if let Some(peer) = to {
                    self.check_peer(&ticket.tenant, peer)
                        .await
                        .map_err(|message| StepFailure {
                            failure: Failure {
                                step: Some(step.id.clone()),
                                code: Code::PeerNotFound,
                                kind: Some(ErrorKind::Config),
                                message,
                            },
                            attempts: 1,
                            attempt_errors: Vec::new(),
                            module: None,
                        })?;
                }
                let mut event = self
                    .new_event(
                        ticket,
                        EmittedEvent {
                            event_type: event_type.clone(),
                            data,
                        },
                    )
                    .map_err(|failure| StepFailure {
                        failure: Failure {
                            step: Some(step.id.clone()),
                            ..failure
                        },
                        attempts: 1,
                        attempt_errors: Vec::new(),
                        module: None,
                    })?;
                if let Some(peer) = to {
                    event.extensions.insert(
                        super::event::TO_EXTENSION.into(),
                        Value::String(peer.clone()),
                    );
                }
                Ok(StepDone {
                    record: StepRecord {
                        id: step.id.clone(),
                        status: StepStatus::Succeeded,
                        module: None,
                        output: flow_input,
                        input,
                        logs: Vec::new(),
                        attempts: 1,
                        attempt_errors: Vec::new(),
                        started_unix_ms: started,
                        finished_unix_ms: now_ms(),
                        error: None,
                        emitted: vec![event.id.clone()],
                    },
                    emitted: vec![event],
                })
            }
            Action::Call {
                module,
                function,
                grant,
                retry,
            } => {
                let mut attempt_errors = Vec::new();
                let mut attempt = 0;
                let bytes = serde_json::to_vec(&input).unwrap_or_default();
                loop {
                    attempt += 1;
                    let outcome = self
                        .call_once(ticket, step, module, function, grant, &bytes, cancel)
                        .await;
                    let (module_id, error) = match outcome {
                        Ok((module_id, output, logs, emitted)) => {
                            return Ok(StepDone {
                                record: StepRecord {
                                    id: step.id.clone(),
                                    status: StepStatus::Succeeded,
                                    module: Some(module_id),
                                    input,
                                    output,
                                    logs,
                                    attempts: attempt,
                                    attempt_errors,
                                    started_unix_ms: started,
                                    finished_unix_ms: now_ms(),
                                    error: None,
                                    emitted: emitted.iter().map(|e| e.id.clone()).collect(),
                                },
                                emitted,
                            });
                        }
                        Err(failed) => failed,
                    };
                    let retryable = error.kind.is_some_and(|k| retry.retry_on.contains(&k));
                    if !retryable || attempt >= retry.attempts || cancel.is_cancelled() {
                        return Err(StepFailure {
                            failure: error,
                            attempts: attempt,
                            attempt_errors,
                            module: module_id,
                        });
                    }
                    attempt_errors.push(error);
                    let mut delay = retry.delay(attempt + 1);
                    if retry.jitter {
                        delay = delay.mul_f64(0.5 + random_fraction() / 2.0);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Whether `peer` exists and serves `tenant` (an `emit` step's `to`).
    async fn check_peer(&self, tenant: &str, peer: &str) -> Result<(), String> {
        let (db, name) = (self.db.clone(), peer.to_owned());
        let found = tokio::task::spawn_blocking(move || {
            crate::federation::peers::get_peer(&db.read(), &name)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        match found {
            Some(p) if p.tenant == tenant => Ok(()),
            Some(_) => Err(format!("peer `{peer}` does not serve tenant `{tenant}`")),
            None => Err(format!("no peer named `{peer}`")),
        }
    }

    /// One attempt of a call step: the module's id, output, logs and emitted events.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    async fn call_once(
        &self,
        ticket: &RunTicket,
        step: &Step,
        module: &str,
        function: &str,
        grant: &deadlift_engine::grant::Grant,
        input: &[u8],
        cancel: &CancelToken,
    ) -> Result<
        (
            String,
            Value,
            Vec<deadlift_engine::LogLine>,
            Vec<CloudEvent>,
        ),
        (Option<String>, Failure),
    > {
        let call_failure = |error: &CallError| Failure {
            step: Some(step.id.clone()),
            code: error.code(),
            kind: Some(ErrorKind::of(error)),
            message: error.to_string(),
        };
        let id = self
            .resolve(&ticket.tenant, module)
            .await
            .map_err(|e| (None, call_failure(&e)))?;
        let module_id = id.to_string();
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let ctx = CallContext::new(ticket.tenant.clone())
            .with_run_id(ticket.run_id.clone())
            .with_cancel(cancel.clone())
            .with_emit_buffer(buffer.clone());
        let out = self
            .engine
            .call(&id, function, input, grant, &ctx)
            .await
            .map_err(|e| (Some(module_id.clone()), call_failure(&e)))?;
        let output = if out.output.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&out.output).map_err(|e| {
                (
                    Some(module_id.clone()),
                    Failure {
                        step: Some(step.id.clone()),
                        code: Code::OutputNotJson,
                        kind: Some(ErrorKind::Guest),
                        message: format!("the step's output is not JSON: {e}"),
                    },
                )
            })?
        };
        let emitted = std::mem::take(&mut *buffer.lock());
        let emitted = emitted
            .into_iter()
            .map(|event| self.new_event(ticket, event))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|mut f| {
                f.step = Some(step.id.clone());
                (Some(module_id.clone()), f)
            })?;
        Ok((module_id, output, out.logs, emitted))
    }

    /// An event a run emits: in the run's trace, one level deeper.
    fn new_event(&self, ticket: &RunTicket, emitted: EmittedEvent) -> Result<CloudEvent, Failure> {
        let depth = ticket.depth + 1;
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
        let mut event = CloudEvent::new(
            emitted.event_type,
            format!("{}/workflows/{}", self.source, ticket.workflow),
            emitted.data,
        );
        event.extensions.insert(
            "traceparent".into(),
            Value::String(ticket.trace.child().to_string()),
        );
        event
            .extensions
            .insert(DEPTH_EXTENSION.into(), json!(depth));
        Ok(event)
    }

    async fn journal(
        &self,
        ticket: &Arc<RunTicket>,
        position: usize,
        done: StepDone,
        finish: Option<Finish>,
    ) -> Result<(), DbError> {
        ticket
            .journaled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Step {
                ticket: ticket.clone(),
                position,
                record: done.record,
                emitted: done.emitted,
                finish,
                reply,
            })
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)?
    }

    async fn journal_finish(&self, ticket: &Arc<RunTicket>, finish: Finish) -> Result<(), DbError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Finish {
                run_seq: ticket.run_seq,
                finish,
                reply,
            })
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)?
    }

    /// Runs a pipeline workflow now, in memory, and journals the whole run once it is
    /// over: the Deadlift v1 execute route, where the caller waits for the answer. The
    /// record is committed just after the answer (a crash in between loses the record
    /// of that call; the caller has its answer and sent nothing for durable processing).
    pub async fn execute_now(
        &self,
        run: journal::NewRun,
        workflow: &Workflow,
    ) -> Result<Result<Value, Failure>, DbError> {
        let ticket = RunTicket {
            run_id: String::new(),
            run_seq: 0,
            tenant: run.tenant.clone(),
            workflow: run.workflow.clone(),
            version: run.version,
            input: run.input.clone(),
            event: None,
            trace: run.trace,
            depth: 0,
            done: Vec::new(),
            started: true,
            journaled: Arc::default(),
        };
        let cancel = CancelToken::new();
        let mut outputs = Value::Object(Default::default());
        let mut current = run.input.clone();
        let mut steps = Vec::new();
        let mut emitted = Vec::new();
        let mut result = Ok(Value::Null);
        for step in &workflow.steps {
            let scope = Scope {
                event: &Value::Null,
                input: &ticket.input,
                steps: &outputs,
            };
            match self
                .run_step(&ticket, step, current.clone(), scope, &cancel)
                .await
            {
                Ok(done) => {
                    current = done.record.output.clone();
                    add_output(&mut outputs, &done.record);
                    let stop = current.is_null() && done.record.status == StepStatus::Succeeded;
                    steps.push(done.record);
                    emitted.extend(done.emitted);
                    result = Ok(current.clone());
                    if stop {
                        break;
                    }
                }
                Err(failure) => {
                    let (record, run_failure) = failure_record(step, current, failure);
                    steps.push(record);
                    result = Err(run_failure);
                    break;
                }
            }
        }
        let finish = match &result {
            Ok(output) => succeeded(output.clone()),
            Err(failure) => failed(failure.clone(), false),
        };
        // The caller waits for the output, not for the record: the record commits in the
        // writer's next group, after the answer. A bounded number of records may be in
        // flight, so a writer that falls behind slows callers down instead of queueing
        // without limit.
        let permit = self
            .unrecorded
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| DbError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let workflow = run.workflow.clone();
        self.commands
            .send(Command::Record {
                run,
                steps,
                emitted,
                finish,
                reply,
            })
            .map_err(|_| DbError::Closed)?;
        tokio::spawn(async move {
            if let Ok(Err(error)) = answer.await {
                tracing::error!(%workflow, %error, "a finished run could not be recorded");
            }
            drop(permit);
        });
        Ok(result)
    }

    /// Waits until a run finishes (or `timeout` passes); `None` on timeout.
    pub async fn wait(&self, run_id: &str, timeout: Duration) -> Option<RunSummary> {
        let (tx, rx) = oneshot::channel();
        self.outlets
            .waiters
            .lock()
            .entry(run_id.to_owned())
            .or_default()
            .push(tx);
        // The run may have finished before the waiter was registered.
        let db = self.db.clone();
        let id = run_id.to_owned();
        let already = tokio::task::spawn_blocking(move || {
            journal::run_summary_by_id(&db.read(), &id).ok().flatten()
        })
        .await
        .ok()
        .flatten();
        let result = match already {
            Some((_, summary)) if summary.status.is_finished() => Some(summary),
            _ => tokio::time::timeout(timeout, rx)
                .await
                .ok()
                .and_then(Result::ok),
        };
        let mut waiters = self.outlets.waiters.lock();
        if let Some(list) = waiters.get_mut(run_id) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiters.remove(run_id);
            }
        }
        result
    }
}

fn internal(message: String) -> Failure {
    Failure {
        step: None,
        code: Code::Internal,
        kind: Some(ErrorKind::Host),
        message,
    }
}

fn succeeded(output: Value) -> Finish {
    Finish {
        status: RunStatus::Succeeded,
        output: Some(output),
        error: None,
        dead_letter: false,
    }
}

fn failed(failure: Failure, dead_letter: bool) -> Finish {
    Finish {
        status: RunStatus::Failed,
        output: None,
        error: Some(failure),
        dead_letter,
    }
}

fn skipped(step: &Step, output: Value) -> StepRecord {
    let now = now_ms();
    StepRecord {
        id: step.id.clone(),
        status: StepStatus::Skipped,
        module: None,
        input: Value::Null,
        output,
        logs: Vec::new(),
        attempts: 0,
        attempt_errors: Vec::new(),
        started_unix_ms: now,
        finished_unix_ms: now,
        error: None,
        emitted: Vec::new(),
    }
}

fn failure_record(step: &Step, input: Value, failure: StepFailure) -> (StepRecord, Failure) {
    let now = now_ms();
    let mut run_failure = failure.failure;
    run_failure.step = Some(step.id.clone());
    let record = StepRecord {
        id: step.id.clone(),
        status: StepStatus::Failed,
        module: failure.module,
        input,
        output: Value::Null,
        logs: Vec::new(),
        attempts: failure.attempts,
        attempt_errors: failure.attempt_errors,
        started_unix_ms: now,
        finished_unix_ms: now,
        error: Some(run_failure.clone()),
        emitted: Vec::new(),
    };
    (record, run_failure)
}

/// `steps` as expressions see it: id → `{"output": ...}`.
fn step_outputs(done: &[StepRecord]) -> Value {
    let mut outputs = Value::Object(Default::default());
    for record in done {
        add_output(&mut outputs, record);
    }
    outputs
}

fn add_output(outputs: &mut Value, record: &StepRecord) {
    if let Value::Object(map) = outputs {
        map.insert(record.id.clone(), json!({ "output": record.output }));
    }
}

/// A graph run's output: the single sink's output, or an object of all sinks' outputs.
fn graph_output(workflow: &Workflow, values: &[Value]) -> Value {
    match workflow.sinks().as_slice() {
        [one] => values[*one].clone(),
        many => Value::Object(
            many.iter()
                .map(|&i| (workflow.steps[i].id.clone(), values[i].clone()))
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        ),
    }
}
