//! The journal writer: one thread that owns every write to the workflow tables and
//! commits them in groups. Whatever is queued while a transaction runs goes into the
//! next one, so thousands of small writes a second cost a few commits. Each command
//! runs in its own savepoint, so one bad command cannot spoil its neighbours.
//!
//! Nothing is acknowledged before its transaction commits: replies, new runs for the
//! runner and run updates for watchers are all sent after the commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use rusqlite::Connection;
use tokio::sync::{broadcast, mpsc, oneshot};

use super as sql;
use crate::clock::now_ms;
use crate::workflow::journal::{JournalReceiver, JournalStats};

use super::command::{Command, Reply, ReplyFn};
use super::routing::{Route, Routes, load_routes, route_of};
use crate::federation::PeerDirectory;
use crate::store::{Database, DbError};
use crate::workflow::event::CloudEvent;
use crate::workflow::records::{NewRun, RunStatus, RunSummary, RunTicket, RunUpdate, TriggerKind};

/// Most commands one transaction takes.
const MAX_BATCH: usize = 1024;

/// Handles the writer shares with the rest of the workflow runtime.
#[derive(Debug, Clone)]
pub(crate) struct Outlets {
    /// New and requeued runs for the runner.
    pub runs: mpsc::UnboundedSender<RunTicket>,
    pub updates: broadcast::Sender<RunUpdate>,
    /// Runs someone waits for, by run id.
    pub waiters: Arc<Mutex<HashMap<String, Vec<oneshot::Sender<RunSummary>>>>>,
    /// Told when the set of workflows changed (the scheduler reloads).
    pub workflows_changed: Arc<tokio::sync::Notify>,
    /// Told when the outbox has new work (the deliverer wakes).
    pub outbox: Arc<tokio::sync::Notify>,
    /// Counters of what the writer committed, for metrics.
    pub stats: Arc<JournalStats>,
}

/// Starts the writer thread on the commands of `journal`: it loads the routing table,
/// then commits until every sender of the queue is dropped.
pub(crate) fn start(
    db: Database,
    receiver: JournalReceiver,
    peers: PeerDirectory,
    outlets: Outlets,
) -> Result<std::thread::JoinHandle<()>, DbError> {
    let routes = load_routes(&db.lock())?;
    let writer = Writer::new(db, routes, peers, outlets);
    std::thread::Builder::new()
        .name("deadlift-journal".into())
        .spawn(move || writer.run(receiver.0))
        .map_err(DbError::Start)
}

// Indexes of `Effects::counts`, in the order of `JournalStats::counters`.
pub(super) const EVENTS_STORED: usize = 0;
pub(super) const EVENTS_DUPLICATE: usize = 1;
pub(super) const RUNS_STARTED: usize = 2;
const RUNS_SUCCEEDED: usize = 3;
const RUNS_FAILED: usize = 4;
pub(super) const DELIVERIES_QUEUED: usize = 5;

/// What to do once the transaction holding a command has committed.
#[derive(Default)]
pub(super) struct Effects {
    pub(super) replies: Vec<ReplyFn>,
    pub(super) tickets: Vec<RunTicket>,
    pub(super) changed_runs: Vec<i64>,
    /// Runs other agents of the cluster ran, stored here: announced to watchers as
    /// imported (not this agent's to export or share again).
    pub(super) imported_runs: Vec<i64>,
    pub(super) route_changes: Vec<(String, String, Option<Route>)>,
    pub(super) outbox_changed: bool,
    /// Counter increments, applied after the commit: indexes into `JournalStats::counters`.
    pub(super) counts: [u64; 6],
}

impl Effects {
    pub(super) fn count(&mut self, counter: usize) {
        self.counts[counter] += 1;
    }

    fn count_finish(&mut self, status: RunStatus) {
        match status {
            RunStatus::Succeeded => self.count(RUNS_SUCCEEDED),
            RunStatus::Failed => self.count(RUNS_FAILED),
            _ => {}
        }
    }

    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        self.replies.push(Box::new(move |committed| {
            let _ = reply.send(committed.map(|()| value));
        }));
    }

    fn fail<T>(reply: Reply<T>, error: DbError) {
        let _ = reply.send(Err(error));
    }
}

pub(super) struct Writer {
    pub(super) db: Database,
    pub(super) routes: Routes,
    pub(super) peers: PeerDirectory,
    pub(super) outlets: Outlets,
}

impl Writer {
    pub fn new(db: Database, routes: Routes, peers: PeerDirectory, outlets: Outlets) -> Self {
        Self {
            db,
            routes,
            peers,
            outlets,
        }
    }

    /// Runs until every sender is dropped.
    pub fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = commands.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.outlets
                .stats
                .writes_waiting
                .fetch_sub(batch.len() as u64, Ordering::Relaxed);
            self.commit(&mut batch);
        }
    }

    fn commit(&mut self, batch: &mut Vec<Command>) {
        let db = self.db.clone();
        let mut conn = db.lock();
        let mut effects = Effects::default();
        let outcome = (|| -> Result<(), DbError> {
            let tx = conn.transaction()?;
            for command in batch.drain(..) {
                self.apply(&tx, command, &mut effects);
            }
            tx.commit()?;
            Ok(())
        })();
        match outcome {
            Ok(()) => {
                let summaries = self.summaries(&conn, &effects.changed_runs);
                let imported = self.summaries(&conn, &effects.imported_runs);
                drop(conn);
                self.after_commit(effects, summaries, imported);
            }
            Err(error) => {
                drop(conn);
                let message = error.to_string();
                tracing::error!(error = %message, "journal transaction failed");
                for reply in effects.replies {
                    reply(Err(DbError::Commit(message.clone())));
                }
            }
        }
    }

    /// Summaries of changed runs, read only when someone is listening.
    fn summaries(&self, conn: &Connection, runs: &[i64]) -> Vec<(String, RunSummary)> {
        let waiting = !self.outlets.waiters.lock().is_empty();
        if runs.is_empty() || (self.outlets.updates.receiver_count() == 0 && !waiting) {
            return Vec::new();
        }
        runs.iter()
            .filter_map(|&seq| sql::run_summary(conn, seq).ok().flatten())
            .collect()
    }

    fn after_commit(
        &mut self,
        effects: Effects,
        summaries: Vec<(String, RunSummary)>,
        imported: Vec<(String, RunSummary)>,
    ) {
        // Counters first, so that whoever gets a reply sees them already counted.
        let stats = &self.outlets.stats;
        let counters = [
            &stats.events_stored,
            &stats.events_duplicate,
            &stats.runs_started,
            &stats.runs_succeeded,
            &stats.runs_failed,
            &stats.deliveries_queued,
        ];
        for (counter, n) in counters.into_iter().zip(effects.counts) {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        for reply in effects.replies {
            reply(Ok(()));
        }
        for (tenant, name, route) in effects.route_changes {
            let routes = self.routes.entry(tenant).or_default();
            routes.retain(|r| r.workflow != name);
            routes.extend(route);
        }
        if effects.outbox_changed {
            self.outlets.outbox.notify_one();
        }
        for ticket in effects.tickets {
            let _ = self.outlets.runs.send(ticket);
        }
        if summaries.is_empty() && imported.is_empty() {
            return;
        }
        let mut waiters = self.outlets.waiters.lock();
        let all = summaries
            .into_iter()
            .map(|summary| (summary, false))
            .chain(imported.into_iter().map(|summary| (summary, true)));
        for ((tenant, run), imported) in all {
            if run.status.is_finished() {
                for waiter in waiters.remove(&run.id).into_iter().flatten() {
                    let _ = waiter.send(run.clone());
                }
            }
            let _ = self.outlets.updates.send(RunUpdate {
                tenant,
                run,
                imported,
            });
        }
    }

    fn apply(&mut self, tx: &Connection, command: Command, effects: &mut Effects) {
        // Each command in its own savepoint: a failure undoes only that command.
        let savepoint = match sql::Savepoint::begin(tx) {
            Ok(savepoint) => savepoint,
            Err(error) => {
                fail_command(command, error);
                return;
            }
        };
        let mut local = Effects::default();
        let result = self.apply_inner(tx, command, &mut local);
        match result {
            Ok(()) => match savepoint.release() {
                Ok(()) => {
                    effects.replies.append(&mut local.replies);
                    effects.tickets.append(&mut local.tickets);
                    effects.changed_runs.append(&mut local.changed_runs);
                    effects.imported_runs.append(&mut local.imported_runs);
                    effects.route_changes.append(&mut local.route_changes);
                    effects.outbox_changed |= local.outbox_changed;
                    for (total, n) in effects.counts.iter_mut().zip(local.counts) {
                        *total += n;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "journal savepoint release failed");
                    for reply in local.replies {
                        reply(Err(DbError::Commit(error.to_string())));
                    }
                }
            },
            Err((error, reply)) => {
                if let Err(undo) = savepoint.roll_back() {
                    tracing::error!(error = %undo, "journal savepoint rollback failed");
                }
                for reply in local.replies {
                    reply(Err(DbError::Commit(error.to_string())));
                }
                reply(Err(error));
            }
        }
    }

    fn apply_inner(
        &mut self,
        tx: &Connection,
        command: Command,
        effects: &mut Effects,
    ) -> Result<(), (DbError, ReplyFn)> {
        let now = now_ms();
        match command {
            Command::Ingest {
                tenant,
                events,
                from_peer,
                reply,
            } => {
                let result = events
                    .into_iter()
                    .map(|event| {
                        self.ingest_from(tx, &tenant, event, from_peer.as_deref(), now, effects)
                    })
                    .collect();
                answer(result, reply, effects)
            }
            Command::IngestLeased {
                tenant,
                event,
                from_peer,
                lease,
                reply,
            } => {
                let result = self.ingest_leased(
                    tx,
                    &tenant,
                    *event,
                    from_peer.as_deref(),
                    lease,
                    now,
                    effects,
                );
                answer(result, reply, effects)
            }
            Command::Write { apply, reply } => answer(apply(tx), reply, effects),
            Command::Apply {
                tenant,
                workflow,
                reply,
            } => {
                let result = sql::apply_workflow(tx, &tenant, &workflow.spec, now);
                if let Ok(version) = result {
                    let route = route_of(&workflow, version);
                    effects
                        .route_changes
                        .push((tenant, workflow.spec.name.clone(), route));
                }
                answer(result, reply, effects)
            }
            Command::ApplyV1 {
                tenant,
                id,
                build,
                reply,
            } => {
                let result = (|| {
                    let id = sql::new_v1_workflow(tx, &tenant, id)?;
                    let workflow = build(id).map_err(|e| {
                        DbError::Corrupt(format!("the v1 workflow built does not compile: {e}"))
                    })?;
                    let version = sql::apply_workflow(tx, &tenant, &workflow.spec, now)?;
                    let route = route_of(&workflow, version);
                    effects
                        .route_changes
                        .push((tenant.clone(), workflow.spec.name.clone(), route));
                    Ok(id)
                })();
                answer(result, reply, effects)
            }
            Command::Delete {
                tenant,
                name,
                reply,
            } => {
                let result = sql::delete_workflow(tx, &tenant, &name);
                effects.route_changes.push((tenant, name, None));
                answer(result, reply, effects)
            }
            Command::StartRun { run, reply } => {
                let result = sql::insert_run(tx, &run, now).and_then(|ticket| {
                    ticket.ok_or_else(|| DbError::Corrupt("the run already exists".into()))
                });
                if let Ok(ticket) = &result {
                    effects.count(RUNS_STARTED);
                    effects.changed_runs.push(ticket.run_seq);
                    effects.tickets.push(ticket.clone());
                }
                answer(result, reply, effects)
            }
            Command::Running { run_seq, execution } => {
                if let Err(error) = sql::mark_running(tx, run_seq, execution, now) {
                    tracing::warn!(%error, run_seq, "cannot mark run running");
                }
                effects.changed_runs.push(run_seq);
                Ok(())
            }
            Command::Step {
                ticket,
                position,
                record,
                emitted,
                finish,
                reply,
            } => {
                let result = (|| {
                    if !sql::is_current_execution(tx, ticket.run_seq, ticket.execution)? {
                        // The run was cancelled (and maybe retried) while this execution
                        // ran: its step, events and end are not the run's any more.
                        return Ok(());
                    }
                    // A run's first record also marks it running (if nothing did yet),
                    // from when that step started: a run never starts after its steps.
                    let started = record.started_unix_ms.min(now);
                    sql::mark_running(tx, ticket.run_seq, ticket.execution, started)?;
                    sql::insert_step(tx, ticket.run_seq, position, &record)?;
                    for event in emitted {
                        self.ingest(tx, &ticket.tenant, event, now, effects)?;
                    }
                    if let Some(end) = &finish {
                        let ended =
                            sql::finish_run(tx, ticket.run_seq, ticket.execution, end, now)?;
                        if ended {
                            effects.count_finish(end.status);
                        }
                        effects.changed_runs.push(ticket.run_seq);
                    }
                    Ok(())
                })();
                answer(result, reply, effects)
            }
            Command::Finish {
                run_seq,
                execution,
                finish,
                reply,
            } => {
                let result = sql::finish_run(tx, run_seq, execution, &finish, now);
                if let Ok(true) = result {
                    effects.count_finish(finish.status);
                }
                effects.changed_runs.push(run_seq);
                answer(result.map(|_| ()), reply, effects)
            }
            Command::Record {
                run,
                steps,
                emitted,
                finish,
                reply,
            } => {
                let result = (|| {
                    let (run_id, run_seq) = sql::insert_finished_run(tx, &run, &finish, now)?;
                    effects.count(RUNS_STARTED);
                    effects.count_finish(finish.status);
                    for (position, step) in steps.iter().enumerate() {
                        sql::insert_step(tx, run_seq, position, step)?;
                    }
                    for event in emitted {
                        self.ingest(tx, &run.tenant, event, now, effects)?;
                    }
                    effects.changed_runs.push(run_seq);
                    Ok(run_id)
                })();
                answer(result, reply, effects)
            }
            Command::Import {
                tenant,
                run,
                ran_by,
                reply,
            } => {
                // Announced as imported: watchers see it, but it is not this agent's to
                // export or share again.
                let result = sql::import_run(tx, &tenant, &run, &ran_by);
                if let Ok(true) = result
                    && let Ok(Some(seq)) = sql::run_seq(tx, &tenant, &run.summary.id)
                {
                    effects.imported_runs.push(seq);
                }
                answer(result, reply, effects)
            }
            Command::Requeue {
                tenant,
                run_id,
                reply,
            } => {
                let result = sql::requeue_run(tx, &tenant, &run_id, now).map(|ticket| {
                    ticket.map(|ticket| {
                        let id = ticket.run_id.clone();
                        effects.changed_runs.push(ticket.run_seq);
                        effects.tickets.push(ticket);
                        id
                    })
                });
                answer(result, reply, effects)
            }
            Command::Cancel {
                tenant,
                run_id,
                reply,
            } => {
                let result = sql::cancel_run(tx, &tenant, &run_id, now);
                answer(result, reply, effects)
            }
            Command::Prune { retention, reply } => {
                answer(sql::prune(tx, &retention, now), reply, effects)
            }
            Command::Schedule {
                tenant,
                workflow,
                version,
                fire_unix_ms,
                reply,
            } => {
                let result = (|| {
                    let mut event = CloudEvent::new(
                        "deadlift.schedule",
                        "deadlift://schedule",
                        serde_json::json!({
                            "workflow": workflow,
                            "scheduled_unix_ms": fire_unix_ms,
                        }),
                    );
                    event.id = format!("schedule:{workflow}:{fire_unix_ms}");
                    event.complete();
                    let Some(seq) = sql::insert_event(tx, &tenant, None, &event, now)? else {
                        return Ok(());
                    };
                    let run = NewRun {
                        tenant: tenant.clone(),
                        workflow: workflow.clone(),
                        version,
                        trigger: TriggerKind::Schedule,
                        input: event.input(),
                        trace: event.trace(),
                        event: Some((seq, event)),
                    };
                    if let Some(ticket) = sql::insert_run(tx, &run, now)? {
                        effects.count(RUNS_STARTED);
                        effects.changed_runs.push(ticket.run_seq);
                        effects.tickets.push(ticket);
                    }
                    Ok(())
                })();
                answer(result, reply, effects)
            }
            Command::Flush { reply } => answer(Ok(()), reply, effects),
        }
    }
}

/// Queues the reply of a command that worked, or hands back the error and the reply.
fn answer<T: Send + 'static>(
    result: Result<T, DbError>,
    reply: Reply<T>,
    effects: &mut Effects,
) -> Result<(), (DbError, ReplyFn)> {
    match result {
        Ok(value) => {
            effects.reply(reply, value);
            Ok(())
        }
        Err(error) => Err((
            error,
            Box::new(move |result: Result<(), DbError>| {
                if let Err(error) = result {
                    let _ = reply.send(Err(error));
                }
            }),
        )),
    }
}

fn fail_command(command: Command, error: DbError) {
    let message = error.to_string();
    let error = || DbError::Commit(message.clone());
    match command {
        Command::Ingest { reply, .. } => Effects::fail(reply, error()),
        Command::IngestLeased { reply, .. } => Effects::fail(reply, error()),
        Command::Write { reply, .. } => Effects::fail(reply, error()),
        Command::Apply { reply, .. } | Command::ApplyV1 { reply, .. } => {
            Effects::fail(reply, error())
        }
        Command::Delete { reply, .. } => Effects::fail(reply, error()),
        Command::Cancel { reply, .. } => Effects::fail(reply, error()),
        Command::StartRun { reply, .. } => Effects::fail(reply, error()),
        Command::Running { .. } => {}
        Command::Step { reply, .. } | Command::Finish { reply, .. } => {
            Effects::fail(reply, error())
        }
        Command::Record { reply, .. } => Effects::fail(reply, error()),
        Command::Requeue { reply, .. } => Effects::fail(reply, error()),
        Command::Import { reply, .. } => Effects::fail(reply, error()),
        Command::Prune { reply, .. } => Effects::fail(reply, error()),
        Command::Schedule { reply, .. } | Command::Flush { reply } => Effects::fail(reply, error()),
    }
}
