//! The journal's SQL for cluster mode (`cluster/`): runs taken over under a lease, runs
//! and dead letters stored from the cluster's history, and v1 workflows another agent
//! created.

use rusqlite::{Connection, OptionalExtension, params};

use super::{finish_run, insert_run_as, insert_step, json_text, open_ticket};
use crate::store::DbError;
use crate::workflow::lease::PriorSteps;
use crate::workflow::records::{NewRun, Run, RunStatus, RunTicket, TriggerKind};

/// Registers the v1 workflow `id` whose workflow another agent of the cluster shared.
pub(crate) fn register_v1_workflow(
    conn: &Connection,
    tenant: &str,
    id: i64,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT OR IGNORE INTO v1_workflows (id, tenant, workflow) VALUES (?1, ?2, ?3)",
        params![id, tenant, crate::workflow::v1::workflow_name(id)],
    )?;
    Ok(())
}

/// Which agent of the cluster ran a run stored from the history (`None`: this one).
pub(crate) fn ran_by(conn: &Connection, tenant: &str, id: &str) -> Result<Option<String>, DbError> {
    Ok(conn
        .prepare_cached("SELECT ran_by FROM runs WHERE tenant = ?1 AND id = ?2")?
        .query_row(params![tenant, id], |row| row.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

/// A run's `seq`, by its id.
pub(crate) fn run_seq(conn: &Connection, tenant: &str, id: &str) -> Result<Option<i64>, DbError> {
    Ok(conn
        .prepare_cached("SELECT seq FROM runs WHERE tenant = ?1 AND id = ?2")?
        .query_row(params![tenant, id], |row| row.get(0))
        .optional()?)
}

/// What taking over a leased run found.
pub(crate) enum Taken {
    /// The run to execute, its journaled steps in `done`.
    Open(Box<RunTicket>),
    /// The run has ended (here, or per the cluster's step journal); its `seq`.
    Ended(i64),
    /// The event already has a run of this workflow under another id.
    Other,
}

/// Takes the run of a leased event by `run.workflow` under the lease's id, with what the
/// cluster journaled for it: a new run; or this agent's own open copy, brought up to the
/// cluster's steps under a new execution (so that nothing still running here from before
/// can journal into it); or nothing to do when the run has ended.
pub(crate) fn take_leased_run(
    conn: &Connection,
    run: &NewRun,
    id: &str,
    prior: &PriorSteps,
    now: i64,
) -> Result<Taken, DbError> {
    let existing: Option<(i64, String)> = conn
        .prepare_cached("SELECT seq, status FROM runs WHERE id = ?1 AND tenant = ?2")?
        .query_row(params![id, run.tenant], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    let seq = match existing {
        Some((seq, status)) if !matches!(status.as_str(), "queued" | "running") => {
            return Ok(Taken::Ended(seq));
        }
        Some((seq, _)) => {
            conn.prepare_cached(
                "UPDATE runs SET execution = execution + 1, status = 'queued', leased = 1 WHERE seq = ?1",
            )?
            .execute([seq])?;
            conn.prepare_cached("DELETE FROM run_steps WHERE run_seq = ?1")?
                .execute([seq])?;
            seq
        }
        None => match insert_run_as(conn, run, id.to_owned(), true, now)? {
            Some(ticket) => ticket.run_seq,
            None => return Ok(Taken::Other),
        },
    };
    for (position, record) in &prior.steps {
        insert_step(conn, seq, *position, record)?;
    }
    if let Some(finish) = &prior.finish {
        let execution: i64 = conn
            .prepare_cached("SELECT execution FROM runs WHERE seq = ?1")?
            .query_row([seq], |row| row.get(0))?;
        finish_run(conn, seq, execution, finish, now)?;
        return Ok(Taken::Ended(seq));
    }
    Ok(match open_ticket(conn, id)? {
        Some(ticket) => Taken::Open(Box::new(ticket)),
        None => Taken::Ended(seq),
    })
}

/// Stores a finished run another agent ran (`ran_by`, its member id), with its steps,
/// under its own id; a run already here under that id is brought up to date (the other
/// agent retried it). A failed run the runner ran is a dead letter here too (shown, not
/// replayed here: its agent replays it), and a retried one that then succeeded is no
/// longer. Answers whether anything changed.
pub(crate) fn import_run(
    conn: &Connection,
    tenant: &str,
    run: &Run,
    ran_by: &str,
) -> Result<bool, DbError> {
    let summary = &run.summary;
    if !summary.status.is_finished() {
        return Ok(false);
    }
    let existing: Option<(i64, Option<i64>)> = conn
        .prepare_cached("SELECT seq, finished_unix_ms FROM runs WHERE id = ?1 AND tenant = ?2")?
        .query_row(params![summary.id, tenant], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    let run_seq = match existing {
        Some((_, finished)) if finished >= summary.finished_unix_ms => return Ok(false),
        Some((seq, _)) => {
            conn.prepare_cached(
                "UPDATE runs SET status = ?2, output = ?3, error = ?4, finished_unix_ms = ?5,
                    ran_by = ?6
                 WHERE seq = ?1",
            )?
            .execute(params![
                seq,
                summary.status.as_str(),
                run.output.as_ref().map(json_text).transpose()?,
                summary.error.as_ref().map(json_text).transpose()?,
                summary.finished_unix_ms,
                ran_by,
            ])?;
            conn.prepare_cached("DELETE FROM run_steps WHERE run_seq = ?1")?
                .execute([seq])?;
            seq
        }
        None => {
            conn.prepare_cached(
                "INSERT INTO runs (id, tenant, workflow, workflow_version, trigger, event_id,
                    status, input, output, error, traceparent, trace_id, depth,
                    created_unix_ms, started_unix_ms, finished_unix_ms, ran_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 0, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                summary.id,
                tenant,
                summary.workflow,
                summary.workflow_version,
                summary.trigger.as_str(),
                summary.event_id,
                summary.status.as_str(),
                json_text(&run.input)?,
                run.output.as_ref().map(json_text).transpose()?,
                summary.error.as_ref().map(json_text).transpose()?,
                run.traceparent,
                summary.trace_id,
                summary.created_unix_ms,
                summary.started_unix_ms,
                summary.finished_unix_ms,
                ran_by,
            ])?;
            conn.last_insert_rowid()
        }
    };
    for (position, step) in run.steps.iter().enumerate() {
        insert_step(conn, run_seq, position, step)?;
    }
    let runner_ran = matches!(
        summary.trigger,
        TriggerKind::Event | TriggerKind::Http | TriggerKind::Schedule
    );
    if summary.status == RunStatus::Failed && runner_ran {
        let error = summary.error.as_ref().map(json_text).transpose()?;
        conn.prepare_cached(
            "INSERT INTO dead_letters (tenant, run_seq, error, created_unix_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (run_seq) DO UPDATE SET error = excluded.error,
                created_unix_ms = excluded.created_unix_ms, replayed_unix_ms = NULL",
        )?
        .execute(params![
            tenant,
            run_seq,
            error.unwrap_or_default(),
            summary.finished_unix_ms
        ])?;
    } else {
        conn.prepare_cached(
            "UPDATE dead_letters SET replayed_unix_ms = COALESCE(replayed_unix_ms, ?2)
             WHERE run_seq = ?1",
        )?
        .execute(params![run_seq, summary.finished_unix_ms])?;
    }
    Ok(true)
}
