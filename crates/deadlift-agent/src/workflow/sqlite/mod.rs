//! The workflow journal on SQLite: the SQL of the workflow, event, run, step and dead
//! letter tables (this file) and the writer thread that commits every write to them
//! (`writer`). Nothing outside this folder sees SQL or a connection of the journal:
//! the rest of the agent goes through [`Journal`](super::Journal). Writes happen only
//! on the writer's thread, inside its group-commit transactions; reads come from the
//! read-only connection.

mod cluster;
pub(crate) mod command;
mod reads;
mod routing;
pub(crate) mod writer;

pub(crate) use cluster::{
    Taken, import_run, ran_by, register_v1_workflow, run_seq, take_leased_run,
};

pub(crate) use reads::{
    dead_letter_run, dead_letters, finished_since, get_run, list_runs, open_run_counts,
    run_summary, run_summary_by_id,
};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use super::event::{CloudEvent, TraceParent, new_id};
use super::records::{
    Failure, Finish, NewRun, Retention, RunStatus, RunTicket, StepRecord, StepStatus,
    WorkflowVersion,
};
use super::spec::WorkflowSpec;
use crate::store::DbError;
use deadlift_engine::Code;

/// A savepoint around one command inside a group commit: released when the command
/// succeeded, rolled back when it failed, so one bad command cannot spoil the others.
#[derive(Debug)]
pub(crate) struct Savepoint<'a>(&'a Connection);

impl<'a> Savepoint<'a> {
    pub(crate) fn begin(tx: &'a Connection) -> Result<Self, DbError> {
        tx.prepare_cached("SAVEPOINT command")?.execute([])?;
        Ok(Self(tx))
    }

    /// Keeps the command's writes (they commit with the group).
    pub(crate) fn release(self) -> Result<(), DbError> {
        self.0.prepare_cached("RELEASE command")?.execute([])?;
        Ok(())
    }

    /// Undoes the command's writes; the group goes on without them.
    pub(crate) fn roll_back(self) -> Result<(), DbError> {
        self.0.prepare_cached("ROLLBACK TO command")?.execute([])?;
        self.0.prepare_cached("RELEASE command")?.execute([])?;
        Ok(())
    }
}

fn json_text(value: &impl Serialize) -> Result<String, DbError> {
    serde_json::to_string(value).map_err(|e| DbError::Corrupt(e.to_string()))
}

fn from_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, DbError> {
    serde_json::from_str(text).map_err(|e| DbError::Corrupt(e.to_string()))
}

// ---- workflows -------------------------------------------------------------------

/// Stores a new version of a workflow and makes it current. Returns the version.
pub(crate) fn apply_workflow(
    conn: &Connection,
    tenant: &str,
    spec: &WorkflowSpec,
    now: i64,
) -> Result<i64, DbError> {
    let version: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM workflow_versions WHERE tenant = ?1 AND name = ?2",
        params![tenant, spec.name],
        |row| row.get(0),
    )?;
    conn.execute(
        "INSERT INTO workflow_versions (tenant, name, version, spec, created_unix_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![tenant, spec.name, version, json_text(spec)?, now],
    )?;
    conn.execute(
        "INSERT INTO workflows (tenant, name, version, updated_unix_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant, name) DO UPDATE SET version = excluded.version, updated_unix_ms = excluded.updated_unix_ms",
        params![tenant, spec.name, version, now],
    )?;
    Ok(version)
}

/// Removes a workflow from the live set; its versions stay for the runs that used them.
pub(crate) fn delete_workflow(
    conn: &Connection,
    tenant: &str,
    name: &str,
) -> Result<bool, DbError> {
    Ok(conn.execute(
        "DELETE FROM workflows WHERE tenant = ?1 AND name = ?2",
        params![tenant, name],
    )? > 0)
}

fn version_row(row: &Row<'_>) -> rusqlite::Result<(String, i64, String, i64)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

fn to_version(
    (name, version, spec, created): (String, i64, String, i64),
) -> Result<WorkflowVersion, DbError> {
    Ok(WorkflowVersion {
        name,
        version,
        spec: from_json(&spec)?,
        created_unix_ms: created,
    })
}

/// The current version of every live workflow of a tenant (all tenants when `None`).
pub(crate) fn live_workflows(
    conn: &Connection,
    tenant: Option<&str>,
) -> Result<Vec<(String, WorkflowVersion)>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT w.tenant, v.name, v.version, v.spec, v.created_unix_ms
         FROM workflows w JOIN workflow_versions v
           ON v.tenant = w.tenant AND v.name = w.name AND v.version = w.version
         WHERE ?1 IS NULL OR w.tenant = ?1 ORDER BY w.tenant, w.name",
    )?;
    let rows = statement.query_map(params![tenant], |row| {
        Ok((
            row.get::<_, String>(0)?,
            (row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?),
        ))
    })?;
    rows.map(|row| {
        let (tenant, version) = row?;
        Ok((tenant, to_version(version)?))
    })
    .collect()
}

/// The current version of one workflow.
pub(crate) fn current_workflow(
    conn: &Connection,
    tenant: &str,
    name: &str,
) -> Result<Option<WorkflowVersion>, DbError> {
    conn.prepare_cached(
        "SELECT v.name, v.version, v.spec, v.created_unix_ms
         FROM workflows w JOIN workflow_versions v
           ON v.tenant = w.tenant AND v.name = w.name AND v.version = w.version
         WHERE w.tenant = ?1 AND w.name = ?2",
    )?
    .query_row(params![tenant, name], version_row)
    .optional()?
    .map(to_version)
    .transpose()
}

/// One stored version, live or not.
pub(crate) fn workflow_version(
    conn: &Connection,
    tenant: &str,
    name: &str,
    version: i64,
) -> Result<Option<WorkflowVersion>, DbError> {
    conn.prepare_cached(
        "SELECT name, version, spec, created_unix_ms FROM workflow_versions
         WHERE tenant = ?1 AND name = ?2 AND version = ?3",
    )?
    .query_row(params![tenant, name, version], version_row)
    .optional()?
    .map(to_version)
    .transpose()
}

/// Registers a v1 workflow id for a workflow name to be created; returns the id.
pub(crate) fn new_v1_workflow(
    conn: &Connection,
    tenant: &str,
    id: Option<i64>,
) -> Result<i64, DbError> {
    conn.execute(
        "INSERT INTO v1_workflows (id, tenant, workflow) VALUES (?1, ?2, '')",
        params![id, tenant],
    )?;
    let id = conn.last_insert_rowid();
    conn.execute(
        "UPDATE v1_workflows SET workflow = ?2 WHERE id = ?1",
        params![id, crate::workflow::v1::workflow_name(id)],
    )?;
    Ok(id)
}

/// The highest v1 workflow id (0 when none).
pub(crate) fn max_v1_workflow_id(conn: &Connection) -> Result<i64, DbError> {
    Ok(
        conn.query_row("SELECT COALESCE(MAX(id), 0) FROM v1_workflows", [], |row| {
            row.get(0)
        })?,
    )
}

// ---- events and runs -------------------------------------------------------------

/// Stores an event unless its id was seen; `None` for a duplicate, else its `seq`.
///
/// Ids are unique per tenant and origin: the tenant's own events share one space, and
/// each peer has its own, so one peer's id can never suppress another's (or the
/// tenant's). A peer's events are keyed `\u{1}<peer>\u{1}<id>`, which no valid event
/// id can spell (ids have no control characters).
pub(crate) fn insert_event(
    conn: &Connection,
    tenant: &str,
    from_peer: Option<&str>,
    event: &CloudEvent,
    now: i64,
) -> Result<Option<i64>, DbError> {
    let key = event_key(from_peer, &event.id);
    let inserted = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO events (tenant, id, type, body, received_unix_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![tenant, key, event.event_type, json_text(event)?, now])?;
    Ok((inserted > 0).then(|| conn.last_insert_rowid()))
}

/// An event's key among the tenant's stored events (see [`insert_event`]).
fn event_key(from_peer: Option<&str>, id: &str) -> String {
    match from_peer {
        Some(peer) => format!("\u{1}{peer}\u{1}{id}"),
        None => id.to_owned(),
    }
}

/// The `seq` of an event stored before.
pub(crate) fn event_seq(
    conn: &Connection,
    tenant: &str,
    from_peer: Option<&str>,
    id: &str,
) -> Result<Option<i64>, DbError> {
    Ok(conn
        .prepare_cached("SELECT seq FROM events WHERE tenant = ?1 AND id = ?2")?
        .query_row(params![tenant, event_key(from_peer, id)], |row| row.get(0))
        .optional()?)
}

/// Creates a queued run; `None` when the event already has a run of this workflow.
pub(crate) fn insert_run(
    conn: &Connection,
    run: &NewRun,
    now: i64,
) -> Result<Option<RunTicket>, DbError> {
    insert_run_as(conn, run, new_id("run_"), false, now)
}

/// [`insert_run`] under a given id; a `leased` run is not resumed at start (see
/// `workflow/lease.rs`).
fn insert_run_as(
    conn: &Connection,
    run: &NewRun,
    id: String,
    leased: bool,
    now: i64,
) -> Result<Option<RunTicket>, DbError> {
    let (event_seq, event_id, event_value, depth) = match &run.event {
        Some((seq, event)) => (
            Some(*seq),
            Some(event.id.as_str()),
            Some(serde_json::to_value(event).map_err(|e| DbError::Corrupt(e.to_string()))?),
            event.depth(),
        ),
        None => (None, None, None, 0),
    };
    let inserted = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO runs (id, tenant, workflow, workflow_version, trigger, event_seq, event_id,
                status, input, traceparent, trace_id, depth, created_unix_ms, leased)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9, ?10, ?11, ?12, ?13)",
        )?
        .execute(params![
            id,
            run.tenant,
            run.workflow,
            run.version,
            run.trigger.as_str(),
            event_seq,
            event_id,
            json_text(&run.input)?,
            run.trace.to_string(),
            run.trace.trace_id_hex(),
            depth as i64,
            now,
            leased,
        ])?;
    if inserted == 0 {
        return Ok(None);
    }
    Ok(Some(RunTicket {
        run_id: id,
        run_seq: conn.last_insert_rowid(),
        execution: 0,
        tenant: run.tenant.clone(),
        workflow: run.workflow.clone(),
        version: run.version,
        input: run.input.clone(),
        event: event_value,
        trace: run.trace,
        depth,
        done: Vec::new(),
        started: false,
        journaled: Default::default(),
        lease: None,
    }))
}

/// Stores a run that already ran to its end (never queued, never dead-lettered: its
/// caller saw the outcome). Returns its id and `seq`.
pub(crate) fn insert_finished_run(
    conn: &Connection,
    run: &NewRun,
    finish: &Finish,
    now: i64,
) -> Result<(String, i64), DbError> {
    let id = new_id("run_");
    conn.prepare_cached(
        "INSERT INTO runs (id, tenant, workflow, workflow_version, trigger, status, input, output, error,
            traceparent, trace_id, depth, created_unix_ms, started_unix_ms, finished_unix_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 0, ?12, ?12, ?12)",
    )?
    .execute(params![
        id,
        run.tenant,
        run.workflow,
        run.version,
        run.trigger.as_str(),
        finish.status.as_str(),
        json_text(&run.input)?,
        finish.output.as_ref().map(json_text).transpose()?,
        finish.error.as_ref().map(json_text).transpose()?,
        run.trace.to_string(),
        run.trace.trace_id_hex(),
        now,
    ])?;
    Ok((id, conn.last_insert_rowid()))
}

pub(crate) fn mark_running(
    conn: &Connection,
    run_seq: i64,
    execution: i64,
    now: i64,
) -> Result<(), DbError> {
    conn.prepare_cached(
        "UPDATE runs SET status = 'running', started_unix_ms = COALESCE(started_unix_ms, ?2)
         WHERE seq = ?1 AND status = 'queued' AND execution = ?3",
    )?
    .execute(params![run_seq, now, execution])?;
    Ok(())
}

/// Whether `execution` is the run's current one and the run is still open: only then
/// may it journal steps or end the run.
pub(crate) fn is_current_execution(
    conn: &Connection,
    run_seq: i64,
    execution: i64,
) -> Result<bool, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM runs WHERE seq = ?1 AND execution = ?2 AND status IN ('queued', 'running')",
        )?
        .query_row(params![run_seq, execution], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Journals a finished step (replacing an earlier failed record of the same step).
pub(crate) fn insert_step(
    conn: &Connection,
    run_seq: i64,
    position: usize,
    step: &StepRecord,
) -> Result<(), DbError> {
    let status = match step.status {
        StepStatus::Succeeded => "succeeded",
        StepStatus::Skipped => "skipped",
        StepStatus::Failed => "failed",
    };
    conn.prepare_cached(
        "INSERT OR REPLACE INTO run_steps (run_seq, step, position, status, record) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![run_seq, step.id, position as i64, status, json_text(step)?])?;
    Ok(())
}

/// Ends a run if `execution` is its current one. A failed run is dead-lettered unless
/// `dead_letter` is false (its caller saw the failure). Returns false when the run was
/// no longer open (e.g. cancelled) or is another execution's.
pub(crate) fn finish_run(
    conn: &Connection,
    run_seq: i64,
    execution: i64,
    finish: &Finish,
    now: i64,
) -> Result<bool, DbError> {
    let Finish {
        status,
        output,
        error,
        dead_letter,
    } = finish;
    let (status, dead_letter) = (*status, *dead_letter);
    let output = output.as_ref().map(json_text).transpose()?;
    let error_text = error.as_ref().map(json_text).transpose()?;
    let changed = conn
        .prepare_cached(
            "UPDATE runs SET status = ?2, output = ?3, error = ?4, finished_unix_ms = ?5,
                started_unix_ms = COALESCE(started_unix_ms, ?5)
             WHERE seq = ?1 AND status IN ('queued', 'running') AND execution = ?6",
        )?
        .execute(params![
            run_seq,
            status.as_str(),
            output,
            error_text,
            now,
            execution
        ])?;
    if changed > 0 && status == RunStatus::Failed && dead_letter {
        conn.prepare_cached(
            "INSERT INTO dead_letters (tenant, run_seq, error, created_unix_ms)
             SELECT tenant, seq, ?2, ?3 FROM runs WHERE seq = ?1
             ON CONFLICT (run_seq) DO UPDATE SET error = excluded.error,
                created_unix_ms = excluded.created_unix_ms, replayed_unix_ms = NULL",
        )?
        .execute(params![run_seq, error_text, now])?;
    }
    Ok(changed > 0)
}

/// Puts a failed or cancelled run back in the queue, keeping its succeeded steps; marks
/// its dead letter replayed. Returns the ticket to run it, or `None` when the run is
/// not the tenant's or is not failed or cancelled.
pub(crate) fn requeue_run(
    conn: &Connection,
    tenant: &str,
    run_id: &str,
    now: i64,
) -> Result<Option<RunTicket>, DbError> {
    let changed = conn.execute(
        "UPDATE runs SET status = 'queued', error = NULL, output = NULL, finished_unix_ms = NULL,
            execution = execution + 1, leased = 0
         WHERE id = ?1 AND tenant = ?2 AND status IN ('failed', 'cancelled') AND ran_by IS NULL",
        params![run_id, tenant],
    )?;
    if changed == 0 {
        return Ok(None);
    }
    conn.execute(
        "DELETE FROM run_steps WHERE run_seq = (SELECT seq FROM runs WHERE id = ?1) AND status = 'failed'",
        params![run_id],
    )?;
    conn.execute(
        "UPDATE dead_letters SET replayed_unix_ms = ?2
         WHERE run_seq = (SELECT seq FROM runs WHERE id = ?1) AND replayed_unix_ms IS NULL",
        params![run_id, now],
    )?;
    open_ticket(conn, run_id)
}

/// Cancels a queued or running run. Returns the execution it cancelled, `None` when the
/// run was not open.
pub(crate) fn cancel_run(
    conn: &Connection,
    tenant: &str,
    run_id: &str,
    now: i64,
) -> Result<Option<i64>, DbError> {
    let failure = Failure {
        step: None,
        code: Code::Cancelled,
        kind: None,
        message: "the run was cancelled".into(),
    };
    Ok(conn
        .prepare_cached(
            "UPDATE runs SET status = 'cancelled', error = ?3, finished_unix_ms = ?4
             WHERE id = ?1 AND tenant = ?2 AND status IN ('queued', 'running') AND ran_by IS NULL
             RETURNING execution",
        )?
        .query_row(params![run_id, tenant, json_text(&failure)?, now], |row| {
            row.get(0)
        })
        .optional()?)
}

/// The ticket of an open (queued or running) run, with its journaled steps.
pub(crate) fn open_ticket(conn: &Connection, run_id: &str) -> Result<Option<RunTicket>, DbError> {
    let row = conn
        .prepare_cached(
            "SELECT r.seq, r.tenant, r.workflow, r.workflow_version, r.input, e.body, r.traceparent, r.depth, r.status,
                r.execution
             FROM runs r LEFT JOIN events e ON e.seq = r.event_seq
             WHERE r.id = ?1 AND r.status IN ('queued', 'running')",
        )?
        .query_row(params![run_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, Option<String>>(5)?,
                row.get::<_, String>(6)?,
                row.get::<_, i64>(7)?,
                row.get::<_, String>(8)?,
                row.get::<_, i64>(9)?,
            ))
        })
        .optional()?;
    let Some((seq, tenant, workflow, version, input, event, traceparent, depth, status, execution)) =
        row
    else {
        return Ok(None);
    };
    let done = steps(conn, seq)?
        .into_iter()
        .filter(|s| s.status != StepStatus::Failed)
        .collect();
    Ok(Some(RunTicket {
        run_id: run_id.to_owned(),
        run_seq: seq,
        execution,
        tenant,
        workflow,
        version,
        input: from_json(&input)?,
        event: event.as_deref().map(from_json).transpose()?,
        trace: TraceParent::parse(&traceparent)
            .ok_or_else(|| DbError::Corrupt(format!("run {run_id} has a bad traceparent")))?,
        depth: depth as u64,
        done,
        started: status == "running",
        journaled: Default::default(),
        lease: None,
    }))
}

/// Ids of every open run, oldest first: what a starting agent resumes.
pub(crate) fn open_runs(conn: &Connection, with_leased: bool) -> Result<Vec<String>, DbError> {
    let mut statement = conn.prepare(
        "SELECT id FROM runs WHERE status IN ('queued', 'running') AND (leased = 0 OR ?1) ORDER BY seq",
    )?;
    let rows = statement.query_map([with_leased], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn steps(conn: &Connection, run_seq: i64) -> Result<Vec<StepRecord>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT record FROM run_steps WHERE run_seq = ?1 ORDER BY position, step",
    )?;
    let rows = statement.query_map(params![run_seq], |row| row.get::<_, String>(0))?;
    rows.map(|row| from_json(&row?)).collect()
}

/// Deletes what the retention policy no longer keeps. Returns (runs, events) deleted.
pub(crate) fn prune(
    conn: &Connection,
    retention: &Retention,
    now: i64,
) -> Result<(usize, usize), DbError> {
    let mut runs = 0;
    if let Some(max_age) = retention.max_age_ms {
        runs += conn.execute(
            "DELETE FROM runs WHERE status IN ('succeeded', 'failed', 'cancelled') AND created_unix_ms < ?1",
            params![now - max_age],
        )?;
    }
    if let Some(max_count) = retention.max_runs_per_tenant {
        let tenants: Vec<String> = {
            let mut statement = conn.prepare("SELECT name FROM tenants")?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for tenant in tenants {
            runs += conn.execute(
                "DELETE FROM runs WHERE tenant = ?1 AND status IN ('succeeded', 'failed', 'cancelled')
                   AND seq < (SELECT seq FROM runs WHERE tenant = ?1 AND status IN ('succeeded', 'failed', 'cancelled')
                              ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                params![tenant, max_count.saturating_sub(1) as i64],
            )?;
        }
    }
    let events = conn.execute(
        "DELETE FROM events WHERE received_unix_ms < ?1
           AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.event_seq = events.seq)",
        params![now - retention.dedupe_window_ms],
    )?;
    Ok((runs, events))
}
