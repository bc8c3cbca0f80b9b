//! Workflows, events and durable runs: the [`Runtime`] an agent starts next to its
//! engine.
//!
//! Events enter through [`Runtime::publish`] (HTTP, module `emit`, `emit` steps,
//! schedules); the journal writer (`writer`) stores each event, dedupes it by id and
//! queues one run per matching workflow in the same transaction; the runner (`runner`)
//! executes runs and journals every step before going on. Everything durable lives in
//! the agent's SQLite database (`journal` holds the SQL).

pub mod event;
pub mod expr;
pub mod journal;
mod runner;
mod schedule;
pub mod spec;
pub use deadlift_engine::subject;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};

pub use event::{CloudEvent, EventError, TraceParent};
pub use journal::NewRun;
pub use journal::{
    DeadLetter, Failure, Retention, Run, RunFilter, RunStatus, RunSummary, StepRecord, StepStatus,
    TriggerKind, WorkflowVersion,
};
pub use spec::{FieldError, SpecError, Workflow, WorkflowSpec};
pub use writer::{Ingested, JournalStats, RunUpdate};

use crate::federation::Identity;
use crate::federation::peers::Peer;
use crate::store::{Database, DbError};
use deadlift_engine::Code;
use deadlift_engine::engine::Engine;
use deadlift_engine::host::{CallContext, EmittedEvent, EventSink, SinkError};
use runner::Runner;
use spec::{ApplyChecks, ModuleFacts};
use writer::Command;

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
    #[error("no dead letter {0}")]
    DeadLetterNotFound(i64),
    #[error("no module has the subject `{0}`")]
    SubjectUnknown(String),
    #[error("a v1 workflow needs a non-empty pipeline")]
    PipelineEmpty,
    #[error("{}", .0.message)]
    RunFailed(Failure),
    #[error("the peer is invalid: {0}")]
    PeerInvalid(String),
    #[error("no peer named `{0}`")]
    PeerNotFound(String),
    #[error("delivery {0} is not dead, so it cannot be replayed")]
    DeliveryNotDead(i64),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl WorkflowError {
    pub fn code(&self) -> Code {
        match self {
            Self::Spec(_) | Self::NameMismatch { .. } => Code::WorkflowInvalid,
            Self::NotFound(_) => Code::WorkflowNotFound,
            Self::Event(EventError::ContentType(_)) => Code::UnsupportedMediaType,
            Self::Event(_) => Code::EventInvalid,
            Self::RunNotFound(_) => Code::RunNotFound,
            Self::RunNotRetryable(_) => Code::RunNotRetryable,
            Self::RunNotOpen(_) => Code::RunNotOpen,
            Self::DeadLetterNotFound(_) => Code::DeadLetterNotFound,
            Self::SubjectUnknown(_) => Code::SubjectUnknown,
            Self::PipelineEmpty => Code::PipelineEmpty,
            Self::RunFailed(_) => Code::RunFailed,
            Self::PeerInvalid(_) => Code::PeerInvalid,
            Self::PeerNotFound(_) => Code::PeerNotFound,
            Self::DeliveryNotDead(_) => Code::DeliveryNotDead,
            Self::Db(DbError::Closed) => Code::ShuttingDown,
            Self::Db(_) => Code::Internal,
        }
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
    /// Retries of deliveries to peers.
    pub delivery: crate::federation::deliver::DeliveryConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 256,
            retention: Retention::default(),
            prune_every: Duration::from_secs(60),
            source: "deadlift://agent".into(),
            delivery: Default::default(),
        }
    }
}

/// The sending half of the journal writer's queue; created before the engine so that
/// the engine's `emit` (outside runs) can publish into the durable inbox.
#[derive(Debug, Clone)]
pub struct Inbox {
    commands: mpsc::UnboundedSender<Command>,
}

/// The receiving half, handed to [`Runtime::start`].
#[derive(Debug)]
pub struct InboxReceiver(mpsc::UnboundedReceiver<Command>);

impl Inbox {
    pub fn new() -> (Self, InboxReceiver) {
        let (commands, receiver) = mpsc::unbounded_channel();
        (Self { commands }, InboxReceiver(receiver))
    }

    /// Stores events durably and routes them; answers after the commit.
    pub async fn publish(
        &self,
        tenant: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<Ingested>, DbError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Ingest {
                tenant: tenant.to_owned(),
                events,
                from_peer: None,
                reply,
            })
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)?
    }

    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, DbError>>) -> Command,
    ) -> Result<T, DbError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)?
    }
}

/// `emit` outside a run (a module called directly): the event goes through the same
/// durable inbox, committed before the host function returns.
#[derive(Debug)]
pub struct InboxSink {
    inbox: Inbox,
    source: String,
}

impl InboxSink {
    pub fn new(inbox: Inbox, source: impl Into<String>) -> Self {
        Self {
            inbox,
            source: source.into(),
        }
    }
}

impl EventSink for InboxSink {
    fn publish(&self, ctx: &CallContext, event: EmittedEvent) -> Result<(), SinkError> {
        let event = CloudEvent::new(event.event_type, self.source.clone(), event.data);
        let (reply, answer) = oneshot::channel();
        self.inbox
            .commands
            .send(Command::Ingest {
                tenant: ctx.tenant.clone(),
                events: vec![event],
                from_peer: None,
                reply,
            })
            .map_err(|_| SinkError::Rejected("the agent is shutting down".into()))?;
        // Engine workers are plain threads, so waiting for the commit here is allowed.
        answer
            .blocking_recv()
            .map_err(|_| SinkError::Rejected("the agent is shutting down".into()))?
            .map_err(|e| SinkError::Rejected(e.to_string()))?;
        Ok(())
    }
}

/// The workflow runtime of an agent.
#[derive(Debug)]
pub struct Runtime {
    inbox: Inbox,
    runner: Arc<Runner>,
    db: Database,
    engine: Engine,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Flips to true when live streams must end (the server is shutting down).
    closing: tokio::sync::watch::Sender<bool>,
    /// Runs a previous process left open, resumed at start.
    resumed: usize,
    identity: Identity,
    /// The current version of each workflow asked for, so that starting a run needs no
    /// database read; kept in step by apply and delete.
    heads: Mutex<HashMap<(String, String), i64>>,
}

struct Checks<'a> {
    engine: &'a Engine,
    tenant: &'a str,
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
}

impl Runtime {
    /// Starts the journal writer, the runner, the scheduler and retention, and resumes
    /// every run a previous process left open. Needs a Tokio runtime.
    pub fn start(
        db: Database,
        engine: Engine,
        inbox: Inbox,
        receiver: InboxReceiver,
        config: RuntimeConfig,
        identity: Identity,
    ) -> Result<Self, DbError> {
        let (run_sender, run_receiver) = mpsc::unbounded_channel();
        let outlets = writer::Outlets {
            runs: run_sender.clone(),
            updates: broadcast::channel(1024).0,
            waiters: Arc::default(),
            workflows_changed: Arc::default(),
            outbox: Arc::default(),
            stats: Arc::default(),
        };
        let (routes, peers, open) = {
            let conn = db.lock();
            let routes = writer::load_routes(&conn)?;
            let peers = crate::federation::peers::list_peers(&conn)?;
            let open = journal::open_runs(&conn)?
                .into_iter()
                .filter_map(|id| journal::open_ticket(&conn, &id).transpose())
                .collect::<Result<Vec<_>, _>>()?;
            (routes, peers, open)
        };
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
        let writer = writer::Writer::new(db.clone(), routes, peers, outlets.clone());
        let writer = std::thread::Builder::new()
            .name("deadlift-journal".into())
            .spawn(move || writer.run(receiver.0))
            .map_err(|e| DbError::Commit(format!("cannot start the journal writer: {e}")))?;
        let runner = Arc::new(Runner::new(
            db.clone(),
            engine.clone(),
            inbox.commands.clone(),
            outlets.clone(),
            config.source.clone(),
        ));
        let tasks = vec![
            tokio::spawn(
                runner
                    .clone()
                    .dispatch(run_receiver, config.max_concurrent_runs),
            ),
            tokio::spawn(schedule::run(
                db.clone(),
                inbox.commands.clone(),
                outlets.workflows_changed.clone(),
            )),
            tokio::spawn(prune_periodically(
                inbox.clone(),
                config.retention,
                config.prune_every,
            )),
            tokio::spawn(crate::federation::deliver::run(
                db.clone(),
                identity.clone(),
                recorder(inbox.clone()),
                outlets.outbox.clone(),
                config.delivery.clone(),
            )),
        ];
        Ok(Self {
            inbox,
            runner,
            db,
            engine,
            tasks: Mutex::new(tasks),
            identity,
            writer: Mutex::new(Some(writer)),
            closing: tokio::sync::watch::channel(false).0,
            resumed,
            heads: Mutex::new(HashMap::new()),
        })
    }

    /// What the journal has committed since start (events, runs, deliveries).
    pub fn stats(&self) -> &writer::JournalStats {
        &self.runner.outlets.stats
    }

    /// This agent's identity (name and signing key).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Registers (or replaces) a peer.
    pub async fn add_peer(&self, peer: Peer) -> Result<(), WorkflowError> {
        peer.validate().map_err(WorkflowError::PeerInvalid)?;
        let db = self.db.clone();
        let tenant = peer.tenant.clone();
        if !tokio::task::spawn_blocking(move || db.tenant_exists(&tenant))
            .await
            .map_err(|e| DbError::Commit(e.to_string()))??
        {
            return Err(WorkflowError::PeerInvalid(format!(
                "tenant: no tenant named `{}`",
                peer.tenant
            )));
        }
        Ok(self
            .inbox
            .request(|reply| Command::PeerUpsert { peer, reply })
            .await?)
    }

    pub async fn remove_peer(&self, name: &str) -> Result<(), WorkflowError> {
        let removed = self
            .inbox
            .request(|reply| Command::PeerRemove {
                name: name.to_owned(),
                reply,
            })
            .await?;
        removed
            .then_some(())
            .ok_or_else(|| WorkflowError::PeerNotFound(name.to_owned()))
    }

    pub async fn peers(&self) -> Result<Vec<Peer>, WorkflowError> {
        self.read(crate::federation::peers::list_peers).await
    }

    pub async fn peer(&self, name: &str) -> Result<Option<Peer>, WorkflowError> {
        let name = name.to_owned();
        self.read(move |conn| crate::federation::peers::get_peer(conn, &name))
            .await
    }

    /// Events a peer delivered: stored in the peer's tenant (deduplicated) and routed like
    /// local events, never sent back to that peer.
    pub async fn receive(
        &self,
        peer: &Peer,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<Ingested>, WorkflowError> {
        Ok(self
            .inbox
            .request(|reply| Command::Ingest {
                tenant: peer.tenant.clone(),
                events,
                from_peer: Some(peer.name.clone()),
                reply,
            })
            .await?)
    }

    /// The outbox, newest first; `status` is pending, delivered or dead.
    pub async fn outbox(
        &self,
        status: Option<String>,
        limit: u32,
    ) -> Result<Vec<crate::federation::peers::OutboxEntry>, WorkflowError> {
        self.read(move |conn| crate::federation::peers::list(conn, status.as_deref(), limit))
            .await
    }

    /// Sends a dead delivery again.
    pub async fn replay_delivery(&self, id: i64) -> Result<(), WorkflowError> {
        let replayed = self
            .inbox
            .request(|reply| Command::OutboxReplay { id, reply })
            .await?;
        replayed
            .then_some(())
            .ok_or(WorkflowError::DeliveryNotDead(id))
    }

    /// How many runs a previous process left open; they were resumed at start.
    pub fn resumed_runs(&self) -> usize {
        self.resumed
    }

    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&rusqlite::Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, WorkflowError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || query(&db.read()))
            .await
            .map_err(|e| DbError::Commit(e.to_string()))?
            .map_err(WorkflowError::from)
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
        let checked = spec.clone();
        tokio::task::spawn_blocking(move || {
            let checks = Checks {
                engine: &engine,
                tenant: &owner,
            };
            Workflow::compile(checked, Some(&checks)).map(|_| ())
        })
        .await
        .map_err(|e| DbError::Commit(e.to_string()))??;
        let name = spec.name.clone();
        let version = self
            .inbox
            .request(|reply| Command::Apply {
                tenant: tenant.to_owned(),
                spec,
                reply,
            })
            .await?;
        self.runner.outlets.workflows_changed.notify_one();
        self.heads()
            .insert((tenant.to_owned(), name.clone()), version);
        let tenant = tenant.to_owned();
        self.read(move |conn| journal::workflow_version(conn, &tenant, &name, version))
            .await?
            .ok_or_else(|| WorkflowError::Db(DbError::Corrupt("applied version vanished".into())))
    }

    pub async fn delete(&self, tenant: &str, name: &str) -> Result<(), WorkflowError> {
        let deleted = self
            .inbox
            .request(|reply| Command::Delete {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                reply,
            })
            .await?;
        self.runner.outlets.workflows_changed.notify_one();
        self.heads().remove(&(tenant.to_owned(), name.to_owned()));
        deleted
            .then_some(())
            .ok_or_else(|| WorkflowError::NotFound(name.to_owned()))
    }

    pub async fn workflows(&self, tenant: &str) -> Result<Vec<WorkflowVersion>, WorkflowError> {
        let tenant = tenant.to_owned();
        let all = self
            .read(move |conn| journal::live_workflows(conn, Some(&tenant)))
            .await?;
        Ok(all.into_iter().map(|(_, version)| version).collect())
    }

    fn heads(&self) -> parking_lot::MutexGuard<'_, HashMap<(String, String), i64>> {
        self.heads.lock()
    }

    /// The current version number of a workflow.
    async fn current_version(&self, tenant: &str, name: &str) -> Result<i64, WorkflowError> {
        let key = (tenant.to_owned(), name.to_owned());
        if let Some(version) = self.heads().get(&key) {
            return Ok(*version);
        }
        let version = self.workflow(tenant, name).await?.version;
        self.heads().insert(key, version);
        Ok(version)
    }

    pub async fn workflow(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<WorkflowVersion, WorkflowError> {
        let (tenant, owned) = (tenant.to_owned(), name.to_owned());
        self.read(move |conn| journal::current_workflow(conn, &tenant, &owned))
            .await?
            .ok_or_else(|| WorkflowError::NotFound(name.to_owned()))
    }

    /// Whether a live workflow of the tenant calls the module (by any reference form).
    pub async fn module_in_use(
        &self,
        tenant: &str,
        module: &deadlift_engine::registry::ModuleInfo,
    ) -> Result<Option<String>, WorkflowError> {
        let id = module.id.to_string();
        let name = module.name.clone();
        let versioned = module.version.as_ref().map(|v| format!("{name}@{v}"));
        for workflow in self.workflows(tenant).await? {
            let uses = workflow.spec.steps.iter().any(|step| {
                step.call.as_deref().is_some_and(|call| {
                    call == id || call == name || Some(call) == versioned.as_deref()
                })
            });
            if uses {
                return Ok(Some(workflow.name));
            }
        }
        Ok(None)
    }

    /// Stores events durably (deduplicated by id) and starts the runs they trigger.
    pub async fn publish(
        &self,
        tenant: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<Ingested>, WorkflowError> {
        Ok(self.inbox.publish(tenant, events).await?)
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
        let run = journal::NewRun {
            tenant: tenant.to_owned(),
            workflow: name.to_owned(),
            version,
            trigger: TriggerKind::Http,
            input,
            event: None,
            trace: trace.map_or_else(TraceParent::new_root, |t| t.child()),
        };
        let ticket = self
            .inbox
            .request(|reply| Command::StartRun { run, reply })
            .await?;
        Ok(ticket.run_id)
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
        let tenant = tenant.to_owned();
        self.read(move |conn| journal::list_runs(conn, &tenant, &filter))
            .await
    }

    pub async fn run(&self, tenant: &str, run_id: &str) -> Result<Run, WorkflowError> {
        let (tenant, id) = (tenant.to_owned(), run_id.to_owned());
        self.read(move |conn| journal::get_run(conn, &tenant, &id))
            .await?
            .ok_or_else(|| WorkflowError::RunNotFound(run_id.to_owned()))
    }

    /// Runs a failed or cancelled run again from its failed step.
    pub async fn retry(&self, tenant: &str, run_id: &str) -> Result<(), WorkflowError> {
        let requeued = self
            .inbox
            .request(|reply| Command::Requeue {
                tenant: tenant.to_owned(),
                run_id: run_id.to_owned(),
                reply,
            })
            .await?;
        if requeued.is_some() {
            return Ok(());
        }
        // Tell "no such run" from "not retryable".
        self.run(tenant, run_id).await?;
        Err(WorkflowError::RunNotRetryable(run_id.to_owned()))
    }

    /// Cancels a queued or running run.
    pub async fn cancel(&self, tenant: &str, run_id: &str) -> Result<(), WorkflowError> {
        let cancelled = self
            .inbox
            .request(|reply| Command::Cancel {
                tenant: tenant.to_owned(),
                run_id: run_id.to_owned(),
                reply,
            })
            .await?;
        if cancelled {
            self.runner.cancel(run_id);
            return Ok(());
        }
        self.run(tenant, run_id).await?;
        Err(WorkflowError::RunNotOpen(run_id.to_owned()))
    }

    pub async fn dead_letters(
        &self,
        tenant: &str,
        include_replayed: bool,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, WorkflowError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| journal::dead_letters(conn, &tenant, include_replayed, limit))
            .await
    }

    /// Replays a dead letter: its run runs again from the failed step. Returns the run.
    pub async fn replay(&self, tenant: &str, id: i64) -> Result<String, WorkflowError> {
        let owner = tenant.to_owned();
        let run_id = self
            .read(move |conn| journal::dead_letter_run(conn, &owner, id))
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
        Ok(self
            .inbox
            .request(|reply| Command::Prune { retention, reply })
            .await?)
    }

    /// Creates a Deadlift v1 workflow: a pipeline of modules named by subject, run
    /// whole by `execute_v1` and from its second module by events of its first
    /// module's subject. Returns the v1 integer id.
    pub async fn create_v1(
        &self,
        tenant: &str,
        name: &str,
        description: Option<String>,
        pipeline: Vec<String>,
        grant: deadlift_engine::grant::Grant,
    ) -> Result<i64, WorkflowError> {
        if pipeline.is_empty() {
            return Err(WorkflowError::PipelineEmpty);
        }
        let registry = self.engine.registry().clone();
        let owner = tenant.to_owned();
        let subjects = pipeline.clone();
        let modules = tokio::task::spawn_blocking(move || {
            let all = registry.list(&owner).unwrap_or_default();
            subjects
                .iter()
                .map(|subject| {
                    all.iter()
                        .filter(|m| &m.name == subject)
                        .max_by_key(|m| m.created_unix_ms)
                        .map(|m| m.id.to_string())
                        .ok_or_else(|| WorkflowError::SubjectUnknown(subject.clone()))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| DbError::Commit(e.to_string()))??;
        let trigger_subject = subject::validate_subject(&pipeline[0])
            .is_ok()
            .then(|| pipeline[0].clone());
        let description = Some(match description {
            Some(text) => format!("Deadlift v1 workflow \"{name}\": {text}"),
            None => format!("Deadlift v1 workflow \"{name}\""),
        });
        let build = move |id: i64| v1_spec(id, description, trigger_subject, &modules, grant);
        let id = self
            .inbox
            .request(|reply| Command::ApplyV1 {
                tenant: tenant.to_owned(),
                build: Box::new(build),
                reply,
            })
            .await?;
        Ok(id)
    }

    /// Journals a run that already happened outside the runner (a hook call), with its
    /// steps and the events it emitted; answers after the commit with the run's id.
    pub async fn record(
        &self,
        run: journal::NewRun,
        steps: Vec<StepRecord>,
        emitted: Vec<CloudEvent>,
        failure: Option<Failure>,
        output: Option<Value>,
    ) -> Result<String, WorkflowError> {
        let finish = writer::Finish {
            status: if failure.is_some() {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            },
            output,
            error: failure,
            dead_letter: false,
        };
        Ok(self
            .inbox
            .request(|reply| Command::Record {
                run,
                steps,
                emitted,
                finish,
                reply,
            })
            .await?)
    }

    /// An event emitted by the application itself (or a plug-in) in the given trace, one
    /// level below it: what hooks' callers publish after a call.
    pub fn event_in_trace(&self, event_type: &str, data: Value, trace: &TraceParent) -> CloudEvent {
        let mut event = CloudEvent::new(event_type, self.runner.source.clone(), data);
        event.extensions.insert(
            "traceparent".into(),
            Value::String(trace.child().to_string()),
        );
        event
    }

    /// Runs a v1 workflow with `input` and answers its output; journaled as a run.
    pub async fn execute_v1(
        &self,
        tenant: &str,
        id: i64,
        input: Value,
    ) -> Result<Value, WorkflowError> {
        let name = journal::v1_workflow_name(id);
        let version = self.current_version(tenant, &name).await?;
        let workflow = self
            .runner
            .workflow(tenant, &name, version)
            .await
            .map_err(WorkflowError::RunFailed)?;
        let run = journal::NewRun {
            tenant: tenant.to_owned(),
            workflow: name,
            version,
            trigger: TriggerKind::V1,
            input,
            event: None,
            trace: TraceParent::new_root(),
        };
        let result = self.runner.execute_now(run, &workflow).await?;
        result.map_err(WorkflowError::RunFailed)
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
        let _ = self.inbox.request(|reply| Command::Flush { reply }).await;
        let _ = self.writer.lock().take();
    }
}

/// The stored form of a v1 workflow: step 1 runs only when the run was not started by
/// an event (an event of the first module's subject means that module already ran).
fn v1_spec(
    id: i64,
    description: Option<String>,
    trigger_subject: Option<String>,
    modules: &[String],
    grant: deadlift_engine::grant::Grant,
) -> WorkflowSpec {
    let steps = modules
        .iter()
        .enumerate()
        .map(|(index, module)| spec::StepSpec {
            id: format!("step{}", index + 1),
            condition: (index == 0).then(|| "event == null".to_owned()),
            input: None,
            needs: Vec::new(),
            call: Some(module.clone()),
            function: Some("_main".into()),
            grant: Some(grant.clone()),
            timeout_ms: None,
            retry: None,
            emit: None,
        })
        .collect();
    WorkflowSpec {
        name: journal::v1_workflow_name(id),
        description,
        trigger: spec::Trigger {
            event: trigger_subject,
            schedule: None,
            http: None,
        },
        steps,
    }
}

/// How the deliverer records attempts: through the journal writer.
fn recorder(inbox: Inbox) -> crate::federation::deliver::Recorder {
    Arc::new(move |ids, attempt| {
        let inbox = inbox.clone();
        Box::pin(async move {
            let result = inbox
                .request(|reply| Command::OutboxAttempt {
                    ids,
                    attempt,
                    reply,
                })
                .await;
            if let Err(error) = result {
                tracing::warn!(%error, "cannot record a delivery attempt");
            }
        })
    })
}

async fn prune_periodically(inbox: Inbox, retention: Retention, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match inbox
            .request(|reply| Command::Prune { retention, reply })
            .await
        {
            Ok((0, 0)) => {}
            Ok((runs, events)) => tracing::info!(runs, events, "retention pruned history"),
            Err(error) => tracing::warn!(%error, "retention failed"),
        }
    }
}
