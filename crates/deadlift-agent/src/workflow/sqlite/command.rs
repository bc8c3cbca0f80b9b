//! The commands the journal writer takes: one per kind of write, each with the channel
//! its answer goes back on after the commit.

use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::store::DbError;
use crate::workflow::event::CloudEvent;
use crate::workflow::records::{Finish, Ingested, NewRun, Retention, Run, RunTicket, StepRecord};
use crate::workflow::spec::Workflow;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, DbError>>;
/// Sends a command's reply once its fate is known.
pub(crate) type ReplyFn = Box<dyn FnOnce(Result<(), DbError>) + Send>;
/// A write submitted by another module (see `Command::Write`).
pub(crate) type WriteFn = Box<dyn FnOnce(&Connection) -> Result<(), DbError> + Send>;

pub(crate) enum Command {
    Ingest {
        tenant: String,
        events: Vec<CloudEvent>,
        /// The peer the events came from (never sent back to it).
        from_peer: Option<String>,
        reply: Reply<Vec<Ingested>>,
    },
    /// One event under a cluster lease (`Journal::publish_leased`).
    IngestLeased {
        tenant: String,
        event: Box<CloudEvent>,
        /// The peer that delivered it to an agent of the cluster.
        from_peer: Option<String>,
        lease: std::sync::Arc<dyn crate::workflow::RunLease>,
        reply: Reply<Ingested>,
    },
    /// Another module's write (federation's peers and delivery attempts), in this
    /// writer's transaction and savepoint, so that it shares the group commit.
    Write {
        apply: WriteFn,
        reply: Reply<()>,
    },
    Apply {
        tenant: String,
        workflow: Box<Workflow>,
        reply: Reply<i64>,
    },
    /// Creates a v1 workflow: allocates its integer id, then applies the spec built
    /// for that id.
    ApplyV1 {
        tenant: String,
        /// The id to take (the cluster's), or the next one here.
        id: Option<i64>,
        build: Box<dyn FnOnce(i64) -> Result<Workflow, String> + Send>,
        reply: Reply<i64>,
    },
    Delete {
        tenant: String,
        name: String,
        reply: Reply<bool>,
    },
    StartRun {
        run: NewRun,
        reply: Reply<RunTicket>,
    },
    Running {
        run_seq: i64,
        execution: i64,
    },
    Step {
        ticket: Arc<RunTicket>,
        position: usize,
        record: StepRecord,
        emitted: Vec<CloudEvent>,
        finish: Option<Finish>,
        reply: Reply<()>,
    },
    /// Ends a run without a step (its workflow is gone, or it was resumed after its
    /// last step was journaled).
    Finish {
        run_seq: i64,
        execution: i64,
        finish: Finish,
        reply: Reply<()>,
    },
    /// Journals a run that already ran (a v1 execute), in one go.
    Record {
        run: NewRun,
        steps: Vec<StepRecord>,
        emitted: Vec<CloudEvent>,
        finish: Finish,
        reply: Reply<String>,
    },
    /// Stores (or updates) a finished run another agent of the cluster ran, by its id;
    /// answers whether anything changed.
    Import {
        tenant: String,
        run: Box<Run>,
        /// The member id of the agent that ran it.
        ran_by: String,
        reply: Reply<bool>,
    },
    Requeue {
        tenant: String,
        run_id: String,
        reply: Reply<Option<String>>,
    },
    /// Answers the execution it cancelled, `None` when the run was not open.
    Cancel {
        tenant: String,
        run_id: String,
        reply: Reply<Option<i64>>,
    },
    Prune {
        retention: Retention,
        reply: Reply<(usize, usize)>,
    },
    /// Starts the run of one schedule firing, unless that firing already has one.
    Schedule {
        tenant: String,
        workflow: String,
        version: i64,
        fire_unix_ms: i64,
        reply: Reply<()>,
    },
    /// Answers once everything queued before it has committed.
    Flush {
        reply: Reply<()>,
    },
}
