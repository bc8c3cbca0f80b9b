//! Workflows, events and durable runs: the [`Runtime`] an agent starts next to its
//! engine.
//!
//! Events enter through [`Runtime::publish`] (HTTP, module `emit`, `emit` steps,
//! schedules). The [`Journal`] stores each event, dedupes it by id and queues one run
//! per matching workflow in the same transaction; the runner (`runner`) executes runs on
//! the step executor (`step`) and journals every step before going on. Everything
//! durable goes through the journal, whose SQLite implementation lives in `sqlite/`.

pub mod event;
pub mod expr;
mod journal;
mod lease;
pub mod records;
mod runner;
mod schedule;
pub mod spec;
mod sqlite;
mod step;
pub mod v1;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc};

pub(crate) use event::random_fraction;
pub use event::{CloudEvent, EventError, TraceParent};
pub(crate) use journal::JournalReceiver;
pub use journal::{EventOutlet, Journal, JournalSink, JournalStats};
pub use lease::{LeaseLost, PriorSteps, RunLease};
pub use records::{
    DeadLetter, Failure, Finish, Ingested, NewRun, Retention, Run, RunFilter, RunStatus,
    RunSummary, RunUpdate, StepRecord, StepStatus, TriggerKind, WorkflowVersion,
};
pub use schedule::FiringClaims;
pub use spec::{FieldError, SpecError, Workflow, WorkflowSpec};
pub use step::StepOutcome;
pub(crate) use step::StepScope;

use crate::federation::PeerDirectory;
use crate::policy::{Policy, PolicyHandle};
use crate::store::DbError;
use deadlift_engine::{Code, Engine, ModuleInfo};
use runner::Runner;
use spec::{ApplyChecks, ModuleFacts};
use step::StepExecutor;

/// Failures of workflow operations, each with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("the name in the document (`{document}`) differs from the route's (`{route}`)")]
    NameMismatch { document: String, route: String },
    #[error("no workflow named `{0}`")]
    NotFound(String),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("no run {0}")]
    RunNotFound(String),
    #[error("run {0} is not failed or cancelled, so it cannot be retried")]
    RunNotRetryable(String),
    #[error("run {0} is not queued or running")]
    RunNotOpen(String),
    #[error(
        "run {run} ran on another agent of the cluster (member {agent}): retry or cancel it there"
    )]
    RunElsewhere { run: String, agent: String },
    #[error("no dead letter {0}")]
    DeadLetterNotFound(i64),
    #[error("no module has the subject `{0}`")]
    SubjectUnknown(String),
    #[error("a v1 workflow needs a non-empty pipeline")]
    PipelineEmpty,
    #[error("{}", .0.message)]
    RunFailed(Failure),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl WorkflowError {
    pub fn code(&self) -> Code {
        match self {
            Self::Spec(_) | Self::NameMismatch { .. } => Code::WorkflowInvalid,
            Self::NotFound(_) => Code::WorkflowNotFound,
            Self::Event(error) => error.code(),
            Self::RunNotFound(_) => Code::RunNotFound,
            Self::RunNotRetryable(_) => Code::RunNotRetryable,
            Self::RunNotOpen(_) => Code::RunNotOpen,
            Self::RunElsewhere { .. } => Code::RunElsewhere,
            Self::DeadLetterNotFound(_) => Code::DeadLetterNotFound,
            Self::SubjectUnknown(_) => Code::SubjectUnknown,
            Self::PipelineEmpty => Code::PipelineEmpty,
            Self::RunFailed(failure) => failure.code,
            Self::Db(error) => error.code(),
        }
    }
}

impl From<tokio::task::JoinError> for WorkflowError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Db(DbError::from(e))
    }
}

/// Settings of the workflow runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Runs executing at once.
    pub max_concurrent_runs: usize,
    pub retention: Retention,
    /// How often the retention policy is applied.
    pub prune_every: Duration,
    /// The source URI of events this agent's runs emit (`deadlift://<agent>`).
    pub source: String,
    /// Whether runs held under a cluster lease are resumed at start: not when the agent
    /// joins the cluster again (their event's next holder resumes them there).
    pub resume_leased: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 256,
            retention: Retention::default(),
            prune_every: Duration::from_secs(60),
            source: "deadlift://agent".into(),
            resume_leased: true,
        }
    }
}

/// The workflow runtime of an agent.
#[derive(Debug)]
pub struct Runtime {
    journal: Journal,
    runner: Arc<Runner>,
    steps: Arc<StepExecutor>,
    engine: Engine,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Flips to true when live streams must end (the server is shutting down).
    closing: tokio::sync::watch::Sender<bool>,
    /// Runs a previous process left open, resumed at start.
    resumed: usize,
    /// The current version of each workflow asked for, so that starting a run needs no
    /// database read; kept in step by apply and delete.
    heads: Mutex<HashMap<(String, String), i64>>,
    /// Told when the outbox has new work (the deliverer wakes).
    outbox_ready: Arc<Notify>,
    /// Who fires scheduled firings, in a cluster.
    claims: schedule::Claims,
    /// Bounds v1 executes answered but not yet recorded.
    v1_unrecorded: Arc<Semaphore>,
    /// The operator's ceilings on tenants' grants.
    policy: PolicyHandle,
}

struct Checks<'a> {
    engine: &'a Engine,
    tenant: &'a str,
    policy: &'a Policy,
}

impl ApplyChecks for Checks<'_> {
    fn module(&self, reference: &str) -> Result<ModuleFacts, String> {
        let info = self
            .engine
            .registry()
            .resolve(self.tenant, reference)
            .map_err(|e| format!("module `{reference}`: {e}"))?;
        Ok(ModuleFacts {
            exports: info
                .exports
                .iter()
                .filter(|e| e.kind == "function")
                .map(|e| e.name.clone())
                .collect(),
            host_imports: info
                .imports
                .iter()
                .filter(|i| i.module == "extism:host/user")
                .map(|i| i.name.clone())
                .collect(),
        })
    }

    fn offers_host_function(&self, name: &str) -> bool {
        self.engine.offers_host_function(name)
    }

    fn grant_excess(&self, grant: &deadlift_engine::Grant) -> Vec<(&'static str, String)> {
        self.policy
            .check(self.tenant, grant)
            .into_iter()
            .map(|excess| (excess.field, excess.message))
            .collect()
    }
}

impl Runtime {
    /// Starts the journal writer, the runner, the scheduler and retention, and resumes
    /// every run a previous process left open. Needs a Tokio runtime.
    #[allow(clippy::too_many_arguments)] // the agent's parts, each once
    pub(crate) fn start(
        engine: Engine,
        journal: Journal,
        receiver: JournalReceiver,
        peers: PeerDirectory,
        policy: PolicyHandle,
        config: RuntimeConfig,
        tapes: Arc<crate::tapes::Tapes>,
        releases: Arc<crate::releases::Releases>,
    ) -> Result<Self, DbError> {
        let (run_sender, run_receiver) = mpsc::unbounded_channel();
        let outlets = sqlite::writer::Outlets {
            runs: run_sender.clone(),
            updates: broadcast::channel(1024).0,
            waiters: Arc::default(),
            workflows_changed: Arc::default(),
            outbox: Arc::default(),
            stats: journal.stats().clone(),
        };
        let open = journal.open_tickets(config.resume_leased)?;
        let resumed = open.len();
        if resumed > 0 {
            tracing::info!(
                runs = resumed,
                "resuming runs left open by the previous process"
            );
        }
        for ticket in open {
            let _ = run_sender.send(ticket);
        }
        let writer = sqlite::writer::start(
            journal.database().clone(),
            receiver,
            peers.clone(),
            outlets.clone(),
        )?;
        let steps = Arc::new(StepExecutor::new(
            engine.clone(),
            peers,
            policy.clone(),
            tapes,
            releases,
        ));
        let runner = Arc::new(Runner::new(
            journal.clone(),
            steps.clone(),
            outlets.clone(),
            config.source.clone(),
        ));
        let claims = schedule::Claims::default();
        let tasks = vec![
            tokio::spawn(
                runner
                    .clone()
                    .dispatch(run_receiver, config.max_concurrent_runs),
            ),
            tokio::spawn(schedule::run(
                journal.clone(),
                outlets.workflows_changed.clone(),
                claims.clone(),
            )),
            tokio::spawn(prune_periodically(
                journal.clone(),
                config.retention,
                config.prune_every,
            )),
        ];
        Ok(Self {
            journal,
            runner,
            steps,
            engine,
            tasks: Mutex::new(tasks),
            writer: Mutex::new(Some(writer)),
            closing: tokio::sync::watch::channel(false).0,
            resumed,
            heads: Mutex::new(HashMap::new()),
            outbox_ready: outlets.outbox.clone(),
            v1_unrecorded: v1::unrecorded(),
            policy,
            claims,
        })
    }

    /// What the journal has committed since start (events, runs, deliveries).
    pub fn stats(&self) -> &JournalStats {
        self.journal.stats()
    }

    /// The journal: the agent's durable workflow state.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub(crate) fn outbox_ready(&self) -> &Arc<Notify> {
        &self.outbox_ready
    }

    /// How many runs a previous process left open; they were resumed at start.
    pub fn resumed_runs(&self) -> usize {
        self.resumed
    }

    /// Validates a workflow document against this agent and stores it as a new version.
    pub async fn apply(
        &self,
        tenant: &str,
        mut spec: WorkflowSpec,
        route_name: Option<&str>,
    ) -> Result<WorkflowVersion, WorkflowError> {
        if let Some(route) = route_name {
            if spec.name.is_empty() {
                spec.name = route.to_owned();
            } else if spec.name != route {
                return Err(WorkflowError::NameMismatch {
                    document: spec.name,
                    route: route.to_owned(),
                });
            }
        }
        let engine = self.engine.clone();
        let owner = tenant.to_owned();
        let policy = self.policy.current();
        let workflow = tokio::task::spawn_blocking(move || {
            // Record the module each reference names now. `name@version` and ids stay
            // pinned to it; a bare name follows its release (`releases.rs`).
            for step in &mut spec.steps {
                step.pinned = step.call.as_deref().and_then(|reference| {
                    let info = engine.registry().resolve(&owner, reference).ok()?;
                    Some(info.id.to_string())
                });
            }
            let checks = Checks {
                engine: &engine,
                tenant: &owner,
                policy: &policy,
            };
            Workflow::compile(spec, Some(&checks))
        })
        .await??;
        let name = workflow.spec.name.clone();
        let version = self.journal.apply(tenant, workflow).await?;
        self.runner.outlets.workflows_changed.notify_one();
        self.heads
            .lock()
            .insert((tenant.to_owned(), name.clone()), version);
        self.journal
            .workflow_version(tenant, &name, version)
            .await?
            .ok_or_else(|| WorkflowError::Db(DbError::Corrupt("applied version vanished".into())))
    }

    pub async fn delete(&self, tenant: &str, name: &str) -> Result<(), WorkflowError> {
        let deleted = self.journal.delete(tenant, name).await?;
        self.runner.outlets.workflows_changed.notify_one();
        self.heads
            .lock()
            .remove(&(tenant.to_owned(), name.to_owned()));
        deleted
            .then_some(())
            .ok_or_else(|| WorkflowError::NotFound(name.to_owned()))
    }

    pub async fn workflows(&self, tenant: &str) -> Result<Vec<WorkflowVersion>, WorkflowError> {
        let all = self.journal.live_workflows(Some(tenant)).await?;
        Ok(all.into_iter().map(|(_, version)| version).collect())
    }

    /// The current version number of a workflow.
    async fn current_version(&self, tenant: &str, name: &str) -> Result<i64, WorkflowError> {
        let key = (tenant.to_owned(), name.to_owned());
        if let Some(version) = self.heads.lock().get(&key) {
            return Ok(*version);
        }
        let version = self.workflow(tenant, name).await?.version;
        self.heads.lock().insert(key, version);
        Ok(version)
    }

    pub async fn workflow(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<WorkflowVersion, WorkflowError> {
        self.journal
            .current_workflow(tenant, name)
            .await?
            .ok_or_else(|| WorkflowError::NotFound(name.to_owned()))
    }

    /// Whether a live workflow of the tenant calls the module: by its id, its
    /// `name@version`, or its bare name while it is that name's live version.
    pub async fn module_in_use(
        &self,
        tenant: &str,
        module: &ModuleInfo,
    ) -> Result<Option<String>, WorkflowError> {
        let id = module.id.to_string();
        let name = module.name.clone();
        let versioned = module.version.as_ref().map(|v| format!("{name}@{v}"));
        let registry = self.engine.registry().clone();
        let (owner, bare) = (tenant.to_owned(), name.clone());
        let live = tokio::task::spawn_blocking(move || registry.resolve(&owner, &bare))
            .await
            .map_err(DbError::from)?
            .is_ok_and(|current| current.id == module.id);
        for workflow in self.workflows(tenant).await? {
            let uses = workflow.spec.steps.iter().any(|step| {
                step.call.as_deref().is_some_and(|call| {
                    call == id || Some(call) == versioned.as_deref() || (live && call == name)
                })
            });
            if uses {
                return Ok(Some(workflow.name));
            }
        }
        Ok(None)
    }

    /// From now on, only the firings `claims` grants are fired here.
    pub(crate) fn claim_firings_with(&self, claims: Arc<dyn schedule::FiringClaims>) {
        let _ = self.claims.set(claims);
    }

    /// What the cluster's v1 NATS trigger listens for.
    pub(crate) fn v1_triggers(&self) -> V1Triggers {
        V1Triggers {
            journal: self.journal.clone(),
        }
    }

    /// The steps of the tenant's live workflows that call `name` by its bare name, with
    /// what each needs of the version that serves it.
    pub async fn name_uses(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Vec<crate::releases::NameUse>, WorkflowError> {
        let mut uses = Vec::new();
        for workflow in self.workflows(tenant).await? {
            for step in &workflow.spec.steps {
                if step.call.as_deref() != Some(name) {
                    continue;
                }
                uses.push(crate::releases::NameUse {
                    user: format!("workflow `{}` step `{}`", workflow.name, step.id),
                    function: step.function.clone().unwrap_or_else(|| "_main".into()),
                    host_functions: step
                        .grant
                        .as_ref()
                        .map(|grant| grant.host_functions.iter().cloned().collect())
                        .unwrap_or_default(),
                });
            }
        }
        Ok(uses)
    }

    /// Stores events durably (deduplicated by id) and starts the runs they trigger.
    pub async fn publish(
        &self,
        tenant: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<Ingested>, WorkflowError> {
        Ok(self.journal.publish(tenant, events).await?)
    }

    /// Starts a run of a workflow's current version with `input`; returns its id.
    pub async fn start_run(
        &self,
        tenant: &str,
        name: &str,
        input: Value,
        trace: Option<TraceParent>,
    ) -> Result<String, WorkflowError> {
        let version = self.current_version(tenant, name).await?;
        let run = NewRun {
            tenant: tenant.to_owned(),
            workflow: name.to_owned(),
            version,
            trigger: TriggerKind::Http,
            input,
            event: None,
            trace: trace.map_or_else(TraceParent::new_root, |t| t.child()),
        };
        Ok(self.journal.start_run(run).await?.run_id)
    }

    /// Waits for a run to finish, up to `timeout`; `None` if it has not by then.
    pub async fn wait(&self, run_id: &str, timeout: Duration) -> Option<RunSummary> {
        self.runner.wait(run_id, timeout).await
    }

    pub async fn runs(
        &self,
        tenant: &str,
        filter: RunFilter,
    ) -> Result<Vec<RunSummary>, WorkflowError> {
        Ok(self.journal.runs(tenant, filter).await?)
    }

    pub async fn run(&self, tenant: &str, run_id: &str) -> Result<Run, WorkflowError> {
        self.journal
            .run(tenant, run_id)
            .await?
            .ok_or_else(|| WorkflowError::RunNotFound(run_id.to_owned()))
    }

    /// Runs a failed or cancelled run again from its failed step.
    pub async fn retry(&self, tenant: &str, run_id: &str) -> Result<(), WorkflowError> {
        if self.journal.requeue(tenant, run_id).await?.is_some() {
            return Ok(());
        }
        // Tell "no such run" and "another agent's" from "not retryable".
        self.run(tenant, run_id).await?;
        self.not_elsewhere(tenant, run_id).await?;
        Err(WorkflowError::RunNotRetryable(run_id.to_owned()))
    }

    /// Cancels a queued or running run.
    pub async fn cancel(&self, tenant: &str, run_id: &str) -> Result<(), WorkflowError> {
        if let Some(execution) = self.journal.cancel(tenant, run_id).await? {
            self.runner.cancel(run_id, execution);
            return Ok(());
        }
        self.run(tenant, run_id).await?;
        self.not_elsewhere(tenant, run_id).await?;
        Err(WorkflowError::RunNotOpen(run_id.to_owned()))
    }

    /// An error when another agent of the cluster ran the run.
    async fn not_elsewhere(&self, tenant: &str, run_id: &str) -> Result<(), WorkflowError> {
        match self.journal.ran_by(tenant, run_id).await? {
            Some(agent) => Err(WorkflowError::RunElsewhere {
                run: run_id.to_owned(),
                agent,
            }),
            None => Ok(()),
        }
    }

    pub async fn dead_letters(
        &self,
        tenant: &str,
        include_replayed: bool,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, WorkflowError> {
        Ok(self
            .journal
            .dead_letters(tenant, include_replayed, limit)
            .await?)
    }

    /// Replays a dead letter: its run runs again from the failed step. Returns the run.
    pub async fn replay(&self, tenant: &str, id: i64) -> Result<String, WorkflowError> {
        let run_id = self
            .journal
            .dead_letter_run(tenant, id)
            .await?
            .ok_or(WorkflowError::DeadLetterNotFound(id))?;
        self.retry(tenant, &run_id).await?;
        Ok(run_id)
    }

    /// Run updates as they commit, for every tenant (filter by [`RunUpdate::tenant`]),
    /// and a flag that turns true when live streams should end.
    pub fn subscribe(
        &self,
    ) -> (
        broadcast::Receiver<RunUpdate>,
        tokio::sync::watch::Receiver<bool>,
    ) {
        (
            self.runner.outlets.updates.subscribe(),
            self.closing.subscribe(),
        )
    }

    /// Ends live streams (`runs tail`), so that a server can shut down gracefully.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Applies the retention policy now. Returns (runs, events) deleted.
    pub async fn prune(&self, retention: Retention) -> Result<(usize, usize), WorkflowError> {
        Ok(self.journal.prune(retention).await?)
    }

    /// Runs one step outside any workflow (a hook call): the same executor as runs use.
    pub(crate) async fn run_step(
        &self,
        at: step::StepScope<'_>,
        step: &spec::Step,
        input: Value,
    ) -> StepOutcome {
        let empty = Value::Object(Default::default());
        let scope = expr::Scope {
            event: &Value::Null,
            input: &input,
            steps: &empty,
        };
        self.steps.run(at, step, input.clone(), scope).await
    }

    /// Journals a call that already ran outside any workflow (a hook call) as a run of
    /// one step, with the events it emitted; answers the run's id after the commit.
    pub(crate) async fn record(
        &self,
        run: NewRun,
        outcome: StepOutcome,
        failure: Option<Failure>,
        output: Option<Value>,
    ) -> Result<String, DbError> {
        let finish = match failure {
            Some(failure) => runner::failed(failure, false),
            None => runner::succeeded(output.unwrap_or(Value::Null)),
        };
        let recorded =
            self.journal
                .submit_record(run, vec![outcome.record], outcome.emitted, finish)?;
        recorded.await.map_err(|_| DbError::Closed)?
    }

    /// An event emitted by the application itself in the given trace, one level below
    /// it: what hooks' callers publish after a call.
    pub fn event_in_trace(&self, event_type: &str, data: Value, trace: &TraceParent) -> CloudEvent {
        let mut event = CloudEvent::new(event_type, self.runner.source.clone(), data);
        event.extensions.insert(
            "traceparent".into(),
            Value::String(trace.child().to_string()),
        );
        event
    }

    /// The source of events the agent itself emits (`deadlift://<agent>`).
    pub fn source(&self) -> &str {
        &self.runner.source
    }

    /// Stops the runtime's tasks and waits for the journal writer to commit what it
    /// holds. Runs still executing stay open in the database and resume at next start.
    pub async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        // The writer ends when its last sender is dropped; senders live in this runtime,
        // in engine sinks and in in-flight requests, so wait for a quiet queue instead.
        let _ = self.journal.flush().await;
        let _ = self.writer.lock().take();
    }
}

async fn prune_periodically(journal: Journal, retention: Retention, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match journal.prune(retention).await {
            Ok((0, 0)) => {}
            Ok((runs, events)) => tracing::info!(runs, events, "retention pruned history"),
            Err(error) => tracing::warn!(%error, "retention failed"),
        }
    }
}

/// The subjects that start v1 workflows: each v1 workflow's first module's subject, its
/// event trigger (`v1.rs`).
#[derive(Debug, Clone)]
pub(crate) struct V1Triggers {
    journal: Journal,
}

impl V1Triggers {
    pub(crate) async fn subjects(&self) -> Result<std::collections::BTreeSet<String>, DbError> {
        Ok(self
            .journal
            .live_workflows(Some(crate::V1_TENANT))
            .await?
            .into_iter()
            .filter_map(|(_, version)| version.spec.trigger.event)
            .collect())
    }
}
