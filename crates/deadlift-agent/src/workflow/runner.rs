//! Executes durable runs: takes tickets from the journal (new, requeued or resumed
//! runs), walks the workflow's steps as a pipeline or a graph, runs each step on the
//! step executor (`step`), and journals every finished step before going on. A run
//! interrupted by a crash is resumed after its last journaled step.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::expr::Scope;
use super::journal::Journal;
use super::records::{Failure, Finish, RunStatus, RunSummary, RunTicket, StepRecord, StepStatus};
use super::spec::{ErrorKind, Workflow};
use super::sqlite::writer::Outlets;
use super::step::{StepExecutor, StepOutcome, StepScope, skipped};
use crate::store::DbError;
use deadlift_engine::{CancelToken, Code};

/// How long a run's first step may take before the run is marked running on its own.
const MARK_RUNNING_AFTER: Duration = Duration::from_millis(10);
/// Most compiled workflow versions kept in memory.
const MAX_CACHED_WORKFLOWS: usize = 1024;

/// The parts of the runtime the runner uses; shared by every run task.
#[derive(Debug)]
pub(crate) struct Runner {
    pub journal: Journal,
    pub steps: Arc<StepExecutor>,
    pub outlets: Outlets,
    /// The URI runs use as the source of the events they emit.
    pub source: String,
    workflows: Mutex<HashMap<(String, String, i64), Arc<Workflow>>>,
    /// Cancel tokens of the run executions under way (or cancelled while queued), by
    /// run id and execution: a retry is a new execution with a token of its own, so an
    /// earlier execution's cancel cannot stop it.
    running: Mutex<HashMap<(String, i64), CancelToken>>,
}

impl Runner {
    pub fn new(
        journal: Journal,
        steps: Arc<StepExecutor>,
        outlets: Outlets,
        source: String,
    ) -> Self {
        Self {
            journal,
            steps,
            outlets,
            source,
            workflows: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
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
    pub fn cancel(&self, run_id: &str, execution: i64) {
        let mut running = self.running.lock();
        running
            .entry((run_id.to_owned(), execution))
            .or_default()
            .cancel();
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
        let stored = self
            .journal
            .workflow_version(tenant, name, version)
            .await
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

    /// Runs (or resumes) one durable run to its end, journaling as it goes.
    pub async fn execute(self: &Arc<Self>, ticket: RunTicket) {
        let ticket = Arc::new(ticket);
        let key = (ticket.run_id.clone(), ticket.execution);
        // A run cancelled while it was queued finds its token already cancelled.
        let cancel = self.running.lock().entry(key.clone()).or_default().clone();
        if cancel.is_cancelled() {
            self.running.lock().remove(&key);
            return;
        }
        if !ticket.started {
            // A run whose first step is quick is marked running together with that
            // step's record (one commit, one fsync, fewer); a slower one is marked
            // running on its own after a moment, so that watchers see it.
            let (journal, run_seq, execution) =
                (self.journal.clone(), ticket.run_seq, ticket.execution);
            let journaled = ticket.journaled.clone();
            tokio::spawn(async move {
                tokio::time::sleep(MARK_RUNNING_AFTER).await;
                if !journaled.load(std::sync::atomic::Ordering::Relaxed) {
                    journal.mark_running(run_seq, execution);
                }
            });
        }
        let result = match self
            .workflow(&ticket.tenant, &ticket.workflow, ticket.version)
            .await
        {
            Ok(workflow) if workflow.graph => self.run_graph(&ticket, &workflow, &cancel).await,
            Ok(workflow) => self.run_pipeline(&ticket, &workflow, &cancel).await,
            Err(failure) => {
                let finish = failed(failure, true);
                self.journal
                    .finish(ticket.run_seq, ticket.execution, finish)
                    .await
            }
        };
        if let Err(error) = result {
            // The journal is unreachable (shutting down, or the disk failed): the run
            // stays open in the database and is resumed at the next start.
            tracing::warn!(run = %ticket.run_id, %error, "run stopped without finishing");
        }
        self.running.lock().remove(&key);
    }

    /// Where a step of this run executes.
    fn scope_of<'a>(&'a self, ticket: &'a RunTicket, cancel: &'a CancelToken) -> StepScope<'a> {
        StepScope {
            tenant: &ticket.tenant,
            run_id: Some(&ticket.run_id),
            trace: &ticket.trace,
            depth: ticket.depth,
            source: &self.source,
            workflow: Some(&ticket.workflow),
            cancel,
            tenant_grant: true,
        }
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
            return self
                .journal
                .finish(ticket.run_seq, ticket.execution, finish)
                .await;
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
            let at = self.scope_of(ticket, cancel);
            let outcome = self.steps.run(at, step, current.clone(), scope).await;
            let finish = match outcome.failure() {
                Some(failure) => Some(failed(failure.clone(), true)),
                None => {
                    current = outcome.record.output.clone();
                    let last = position + 1 == workflow.steps.len();
                    let ends = last
                        || (current.is_null() && outcome.record.status == StepStatus::Succeeded);
                    add_output(&mut outputs, &outcome.record);
                    ends.then(|| succeeded(current.clone()))
                }
            };
            let ends = finish.is_some();
            let Some(outcome) = self
                .share_step(ticket, position, outcome, finish.as_ref())
                .await
            else {
                return Ok(());
            };
            self.journal
                .step(ticket.clone(), position, outcome, finish)
                .await?;
            if ends {
                return Ok(());
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
                    let outcome = skipped(step, Value::Null);
                    running.spawn(async move { (index, outcome) });
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
                    let at = runner.scope_of(&ticket, &cancel);
                    (index, runner.steps.run(at, step, input, scope).await)
                });
            }
            while let Some(joined) = running.join_next().await {
                let Ok((index, outcome)) = joined else {
                    failure = Some(internal("a step task stopped".into()));
                    continue;
                };
                let step_failure = outcome.failure().cloned();
                status[index] = Some(outcome.record.status);
                values[index] = outcome.record.output.clone();
                add_output(&mut outputs, &outcome.record);
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
                let Some(outcome) = self
                    .share_step(ticket, index, outcome, finish.as_ref())
                    .await
                else {
                    return Ok(());
                };
                self.journal
                    .step(ticket.clone(), index, outcome, finish)
                    .await?;
            }
        }
        if journaled == count && failure.is_none() && ticket.done.len() == count {
            // Resumed after every step was journaled but not the run's end.
            let finish = succeeded(graph_output(workflow, &values));
            return self
                .journal
                .finish(ticket.run_seq, ticket.execution, finish)
                .await;
        }
        Ok(())
    }

    /// A leased run's step goes to the cluster's step journal first, with the events it
    /// emitted (which the local commit then leaves out: the cluster routes them).
    /// `None` when the run is no longer this agent's, which then stops it.
    async fn share_step(
        &self,
        ticket: &RunTicket,
        position: usize,
        outcome: StepOutcome,
        finish: Option<&Finish>,
    ) -> Option<StepOutcome> {
        let Some(lease) = &ticket.lease else {
            return Some(outcome);
        };
        let shared = lease
            .journal_step(
                &ticket.run_id,
                position,
                &outcome.record,
                finish,
                &outcome.emitted,
            )
            .await;
        match shared {
            Ok(()) => Some(StepOutcome {
                emitted: Vec::new(),
                ..outcome
            }),
            Err(lost) => {
                tracing::warn!(run = %ticket.run_id, "{lost}; the run stops on this agent");
                lease.lost(&ticket.run_id, &lost);
                None
            }
        }
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
        let already = self.journal.run_summary(run_id).await.ok().flatten();
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

pub(crate) fn succeeded(output: Value) -> Finish {
    Finish {
        status: RunStatus::Succeeded,
        output: Some(output),
        error: None,
        dead_letter: false,
    }
}

pub(crate) fn failed(failure: Failure, dead_letter: bool) -> Finish {
    Finish {
        status: RunStatus::Failed,
        output: None,
        error: Some(failure),
        dead_letter,
    }
}

/// `steps` as expressions see it: id → `{"output": ...}`.
fn step_outputs(done: &[StepRecord]) -> Value {
    let mut outputs = Value::Object(Default::default());
    for record in done {
        add_output(&mut outputs, record);
    }
    outputs
}

pub(crate) fn add_output(outputs: &mut Value, record: &StepRecord) {
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
