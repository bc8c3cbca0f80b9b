//! [`Journal`], the one door to the agent's durable workflow state. Every write (an
//! event and the runs it starts, a step, a run's end, an applied workflow, a peer or a
//! delivery attempt of federation) and every read of the workflow tables goes through
//! its typed methods, so that the runner, the scheduler, federation, hooks and the
//! server know nothing of how the journal is kept. Today it is SQLite (`sqlite/`: a
//! writer thread that commits in groups, and a read-only connection); a second
//! backend implements these same methods.
//!
//! Writes answer after their commit. Reads run on the blocking pool, never on an async
//! thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::event::CloudEvent;
use super::lease::RunLease;
use super::records::{
    DeadLetter, Finish, Ingested, NewRun, Retention, Run, RunFilter, RunSummary, RunTicket,
    StepRecord, WorkflowVersion,
};
use super::spec::Workflow;
use super::sqlite::{self, command::Command};
use super::step::StepOutcome;

use crate::federation::Peer;
use crate::store::{Database, DbError};
use deadlift_engine::host::SinkError;
use deadlift_engine::{CallContext, EmittedEvent, EventSink};

/// A handle to the journal; cheap to clone.
#[derive(Debug, Clone)]
pub struct Journal {
    commands: mpsc::UnboundedSender<Command>,
    db: Database,
    stats: Arc<JournalStats>,
    /// Set in cluster mode: events emitted outside runs go there ([`JournalSink`]).
    outlet: Arc<std::sync::OnceLock<Arc<dyn EventOutlet>>>,
}

/// Where events modules emit outside runs (direct and hook calls) go in cluster mode:
/// the cluster's events stream, from which any agent runs them.
pub trait EventOutlet: Send + Sync + std::fmt::Debug {
    /// Stores one event of `tenant` in the cluster and waits until it holds it (from an
    /// engine worker thread, which runs no Tokio runtime).
    fn publish_blocking(&self, tenant: &str, event: CloudEvent) -> Result<(), String>;
}

/// The writer's end of the queue, handed to the runtime when it starts.
#[derive(Debug)]
pub(crate) struct JournalReceiver(pub(crate) mpsc::UnboundedReceiver<Command>);

impl Journal {
    /// A journal over `db`. Nothing is committed until the runtime starts the writer.
    pub(crate) fn new(db: Database) -> (Self, JournalReceiver) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let journal = Self {
            commands,
            db,
            stats: Arc::default(),
            outlet: Arc::default(),
        };
        (journal, JournalReceiver(receiver))
    }

    /// Hands a command to the writer, counted as waiting until the writer takes it.
    fn send(&self, command: Command) -> Result<(), DbError> {
        self.stats.writes_waiting.fetch_add(1, Ordering::Relaxed);
        self.commands.send(command).map_err(|_| {
            self.stats.writes_waiting.fetch_sub(1, Ordering::Relaxed);
            DbError::Closed
        })
    }

    /// From now on events emitted outside runs go to `outlet` (cluster mode).
    pub(crate) fn emit_to(&self, outlet: Arc<dyn EventOutlet>) {
        let _ = self.outlet.set(outlet);
    }

    /// What the journal has committed since start.
    pub fn stats(&self) -> &Arc<JournalStats> {
        &self.stats
    }

    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, DbError>>) -> Command,
    ) -> Result<T, DbError> {
        let (reply, answer) = oneshot::channel();
        self.send(command(reply))?;
        answer.await.map_err(|_| DbError::Closed)?
    }

    /// Runs a blocking read on the read-only connection.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || read(&db.read())).await?
    }

    // ---- events ------------------------------------------------------------------

    /// Stores events durably (deduplicated by id) and starts the runs they trigger.
    pub async fn publish(
        &self,
        tenant: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<Ingested>, DbError> {
        self.request(|reply| Command::Ingest {
            tenant: tenant.to_owned(),
            events,
            from_peer: None,
            reply,
        })
        .await
    }

    /// One event the cluster leased to this agent: its runs take the lease's ids and
    /// start after what the cluster journaled for them. Unlike [`publish`](Self::publish),
    /// an event stored here before is routed again, so that runs this agent held before
    /// are taken over; `runs` lists every run of the event, ended ones included. An event
    /// `from_peer` (delivered to an agent of the cluster) is stored as
    /// [`receive`](Self::receive) stores it.
    pub(crate) async fn publish_leased(
        &self,
        tenant: &str,
        event: CloudEvent,
        from_peer: Option<String>,
        lease: Arc<dyn RunLease>,
    ) -> Result<Ingested, DbError> {
        self.request(|reply| Command::IngestLeased {
            tenant: tenant.to_owned(),
            event: Box::new(event),
            from_peer,
            lease,
            reply,
        })
        .await
    }

    /// Events a peer delivered (already checked): stored in the peer's tenant and routed
    /// like local events, never sent back to that peer.
    pub(crate) async fn receive(
        &self,
        peer: &Peer,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<Ingested>, DbError> {
        self.request(|reply| Command::Ingest {
            tenant: peer.tenant.clone(),
            events,
            from_peer: Some(peer.name.clone()),
            reply,
        })
        .await
    }

    /// Another module's write of its own tables, committed with the journal's group.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        apply: impl FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let result = Arc::new(Mutex::new(None));
        let slot = result.clone();
        self.request(|reply| Command::Write {
            apply: Box::new(move |tx| {
                *slot.lock() = Some(apply(tx)?);
                Ok(())
            }),
            reply,
        })
        .await?;
        let value = result.lock().take();
        value.ok_or_else(|| DbError::Commit("a write answered without its result".into()))
    }

    // ---- workflows ---------------------------------------------------------------

    /// Stores a new version of a (validated) workflow and makes it current; returns
    /// the version.
    pub(crate) async fn apply(&self, tenant: &str, workflow: Workflow) -> Result<i64, DbError> {
        self.request(|reply| Command::Apply {
            tenant: tenant.to_owned(),
            workflow: Box::new(workflow),
            reply,
        })
        .await
    }

    /// Allocates a v1 workflow id and applies the spec built for it; returns the id.
    pub(crate) async fn apply_v1(
        &self,
        tenant: &str,
        id: Option<i64>,
        build: impl FnOnce(i64) -> Result<Workflow, String> + Send + 'static,
    ) -> Result<i64, DbError> {
        self.request(|reply| Command::ApplyV1 {
            tenant: tenant.to_owned(),
            id,
            build: Box::new(build),
            reply,
        })
        .await
    }

    /// Records that the workflow `v1-workflow-<id>`, shared by another agent of the
    /// cluster, is the v1 workflow `id` here too.
    pub(crate) async fn register_v1(&self, tenant: &str, id: i64) -> Result<(), DbError> {
        let tenant = tenant.to_owned();
        self.write(move |tx| sqlite::register_v1_workflow(tx, &tenant, id))
            .await
    }

    /// The highest v1 workflow id here (0 when none).
    pub(crate) async fn max_v1_id(&self) -> Result<i64, DbError> {
        self.read(sqlite::max_v1_workflow_id).await
    }

    /// Deletes a workflow (its runs stay); false when there was none.
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<bool, DbError> {
        self.request(|reply| Command::Delete {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            reply,
        })
        .await
    }

    /// Live workflows (current versions), of one tenant or of all, with their tenant.
    pub async fn live_workflows(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(String, WorkflowVersion)>, DbError> {
        let tenant = tenant.map(str::to_owned);
        self.read(move |conn| sqlite::live_workflows(conn, tenant.as_deref()))
            .await
    }

    pub async fn current_workflow(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<WorkflowVersion>, DbError> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.read(move |conn| sqlite::current_workflow(conn, &tenant, &name))
            .await
    }

    pub async fn workflow_version(
        &self,
        tenant: &str,
        name: &str,
        version: i64,
    ) -> Result<Option<WorkflowVersion>, DbError> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.read(move |conn| sqlite::workflow_version(conn, &tenant, &name, version))
            .await
    }

    // ---- runs --------------------------------------------------------------------

    /// Creates a run and queues it for the runner; answers its ticket.
    pub async fn start_run(&self, run: NewRun) -> Result<RunTicket, DbError> {
        self.request(|reply| Command::StartRun { run, reply }).await
    }

    /// Marks a run running (when its first step takes a while); not waited for.
    pub(crate) fn mark_running(&self, run_seq: i64, execution: i64) {
        let _ = self.send(Command::Running { run_seq, execution });
    }

    /// Journals a finished step (and the events it emitted), and the run's end with it
    /// when it is the last.
    pub(crate) async fn step(
        &self,
        ticket: Arc<RunTicket>,
        position: usize,
        outcome: StepOutcome,
        finish: Option<Finish>,
    ) -> Result<(), DbError> {
        ticket
            .journaled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.request(|reply| Command::Step {
            ticket,
            position,
            record: outcome.record,
            emitted: outcome.emitted,
            finish,
            reply,
        })
        .await
    }

    /// Ends a run without a step (if `execution` is still the run's current one).
    pub(crate) async fn finish(
        &self,
        run_seq: i64,
        execution: i64,
        finish: Finish,
    ) -> Result<(), DbError> {
        self.request(|reply| Command::Finish {
            run_seq,
            execution,
            finish,
            reply,
        })
        .await
    }

    /// Queues the record of a run that already ran (a v1 execute, a hook call) with its
    /// steps and emitted events. The returned receiver answers the run's id once the
    /// record commits, so a caller may answer its own caller first.
    pub(crate) fn submit_record(
        &self,
        run: NewRun,
        steps: Vec<StepRecord>,
        emitted: Vec<CloudEvent>,
        finish: Finish,
    ) -> Result<oneshot::Receiver<Result<String, DbError>>, DbError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Record {
            run,
            steps,
            emitted,
            finish,
            reply,
        })?;
        Ok(answer)
    }

    /// Queues a failed or cancelled run again from its failed step; its id, or `None`
    /// when no such run is retryable.
    pub async fn requeue(&self, tenant: &str, run_id: &str) -> Result<Option<String>, DbError> {
        self.request(|reply| Command::Requeue {
            tenant: tenant.to_owned(),
            run_id: run_id.to_owned(),
            reply,
        })
        .await
    }

    /// Marks a queued or running run cancelled; answers the execution it cancelled, or
    /// `None` when the run is not open.
    pub async fn cancel(&self, tenant: &str, run_id: &str) -> Result<Option<i64>, DbError> {
        self.request(|reply| Command::Cancel {
            tenant: tenant.to_owned(),
            run_id: run_id.to_owned(),
            reply,
        })
        .await
    }

    /// Starts the run of one schedule firing, unless that firing already has one.
    pub(crate) async fn fire_schedule(
        &self,
        tenant: &str,
        workflow: &str,
        version: i64,
        fire_unix_ms: i64,
    ) -> Result<(), DbError> {
        self.request(|reply| Command::Schedule {
            tenant: tenant.to_owned(),
            workflow: workflow.to_owned(),
            version,
            fire_unix_ms,
            reply,
        })
        .await
    }

    /// Stores a finished run another agent of the cluster ran (or brings it up to date);
    /// whether anything changed.
    pub(crate) async fn import_run(
        &self,
        tenant: &str,
        run: crate::workflow::Run,
        ran_by: &str,
    ) -> Result<bool, DbError> {
        self.request(|reply| Command::Import {
            tenant: tenant.to_owned(),
            run: Box::new(run),
            ran_by: ran_by.to_owned(),
            reply,
        })
        .await
    }

    /// Applies the retention policy; (runs, events) deleted.
    pub async fn prune(&self, retention: Retention) -> Result<(usize, usize), DbError> {
        self.request(|reply| Command::Prune { retention, reply })
            .await
    }

    /// Answers once everything queued before has committed.
    pub(crate) async fn flush(&self) -> Result<(), DbError> {
        self.request(|reply| Command::Flush { reply }).await
    }

    /// The member id of the cluster's agent that ran a run stored here from the history
    /// (`None` for this agent's own runs).
    pub(crate) async fn ran_by(
        &self,
        tenant: &str,
        run_id: &str,
    ) -> Result<Option<String>, DbError> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        self.read(move |conn| sqlite::ran_by(conn, &tenant, &run_id))
            .await
    }

    /// Runs queued and runs running now, across tenants.
    pub async fn open_runs(&self) -> Result<(u64, u64), DbError> {
        self.read(sqlite::open_run_counts).await
    }

    pub async fn runs(&self, tenant: &str, filter: RunFilter) -> Result<Vec<RunSummary>, DbError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| sqlite::list_runs(conn, &tenant, &filter))
            .await
    }

    /// Every tenant's runs that finished at or after `since` (Unix ms).
    pub(crate) async fn finished_since(
        &self,
        since: i64,
    ) -> Result<Vec<(String, String)>, DbError> {
        self.read(move |conn| sqlite::finished_since(conn, since))
            .await
    }

    pub async fn run(&self, tenant: &str, run_id: &str) -> Result<Option<Run>, DbError> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        self.read(move |conn| sqlite::get_run(conn, &tenant, &run_id))
            .await
    }

    /// A run's summary and tenant, by id alone.
    pub(crate) async fn run_summary(
        &self,
        run_id: &str,
    ) -> Result<Option<(String, RunSummary)>, DbError> {
        let run_id = run_id.to_owned();
        self.read(move |conn| sqlite::run_summary_by_id(conn, &run_id))
            .await
    }

    /// Runs a previous process left open, ready to resume; leased ones only when
    /// `with_leased` (not in cluster mode, where their event's next holder resumes them).
    /// Blocking (at start).
    pub(crate) fn open_tickets(&self, with_leased: bool) -> Result<Vec<RunTicket>, DbError> {
        let conn = self.db.read();
        sqlite::open_runs(&conn, with_leased)?
            .into_iter()
            .filter_map(|id| sqlite::open_ticket(&conn, &id).transpose())
            .collect()
    }

    pub async fn dead_letters(
        &self,
        tenant: &str,
        include_replayed: bool,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, DbError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| sqlite::dead_letters(conn, &tenant, include_replayed, limit))
            .await
    }

    /// The run a dead letter holds.
    pub async fn dead_letter_run(&self, tenant: &str, id: i64) -> Result<Option<String>, DbError> {
        let tenant = tenant.to_owned();
        self.read(move |conn| sqlite::dead_letter_run(conn, &tenant, id))
            .await
    }
}

/// `emit` outside a run (a module called directly): the event goes through the same
/// durable journal, committed before the host function returns.
#[derive(Debug)]
pub struct JournalSink {
    journal: Journal,
    source: String,
}

impl JournalSink {
    pub fn new(journal: Journal, source: impl Into<String>) -> Self {
        Self {
            journal,
            source: source.into(),
        }
    }
}

impl EventSink for JournalSink {
    fn publish(&self, ctx: &CallContext, event: EmittedEvent) -> Result<(), SinkError> {
        let event = CloudEvent::new(event.event_type, self.source.clone(), event.data);
        if let Some(outlet) = self.journal.outlet.get() {
            return outlet
                .publish_blocking(&ctx.tenant, event)
                .map_err(SinkError::Rejected);
        }
        let (reply, answer) = oneshot::channel();
        let shutting_down = || SinkError::Rejected("the agent is shutting down".into());
        self.journal
            .send(Command::Ingest {
                tenant: ctx.tenant.clone(),
                events: vec![event],
                from_peer: None,
                reply,
            })
            .map_err(|_| shutting_down())?;
        // Engine workers are plain threads, so waiting for the commit here is allowed.
        answer
            .blocking_recv()
            .map_err(|_| shutting_down())?
            .map_err(|e| SinkError::Rejected(e.to_string()))?;
        Ok(())
    }
}

/// What the journal has committed since the agent started. The writer counts events,
/// runs and queued deliveries; the deliverer counts delivery outcomes after their
/// commit.
#[derive(Debug, Default)]
pub struct JournalStats {
    pub events_stored: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub runs_started: AtomicU64,
    pub runs_succeeded: AtomicU64,
    pub runs_failed: AtomicU64,
    pub deliveries_queued: AtomicU64,
    pub deliveries_done: AtomicU64,
    pub deliveries_retried: AtomicU64,
    pub deliveries_dead: AtomicU64,
    /// Writes (events to store and route, steps, runs) handed to the writer and not
    /// yet taken into a commit: the journal's backlog.
    pub writes_waiting: AtomicU64,
}

impl JournalStats {
    /// (name, help, value) of every counter, for a metrics page.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "deadlift_events_stored_total",
                "Events committed to the inbox.",
                load(&self.events_stored),
            ),
            (
                "deadlift_events_duplicate_total",
                "Events dropped as repeats of a known id.",
                load(&self.events_duplicate),
            ),
            (
                "deadlift_runs_started_total",
                "Runs created (queued or recorded).",
                load(&self.runs_started),
            ),
            (
                "deadlift_runs_succeeded_total",
                "Runs that ended successfully.",
                load(&self.runs_succeeded),
            ),
            (
                "deadlift_runs_failed_total",
                "Runs that failed.",
                load(&self.runs_failed),
            ),
            (
                "deadlift_deliveries_queued_total",
                "Events put in a peer's outbox.",
                load(&self.deliveries_queued),
            ),
            (
                "deadlift_deliveries_done_total",
                "Outbox entries delivered.",
                load(&self.deliveries_done),
            ),
            (
                "deadlift_deliveries_retried_total",
                "Delivery attempts that will be retried.",
                load(&self.deliveries_retried),
            ),
            (
                "deadlift_deliveries_dead_total",
                "Outbox entries given up on.",
                load(&self.deliveries_dead),
            ),
        ]
    }
}
