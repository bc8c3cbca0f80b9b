//! The journal's reads for the API: runs listed and filtered, one run with its steps,
//! run summaries for watchers, dead letters. All on the read-only connection.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{from_json, steps};
use crate::store::DbError;
use crate::workflow::records::{DeadLetter, Run, RunFilter, RunStatus, RunSummary, TriggerKind};

const SUMMARY_COLUMNS: &str =
    "r.id, r.workflow, r.workflow_version, r.status, r.trigger, r.event_id, r.trace_id,
    r.created_unix_ms, r.started_unix_ms, r.finished_unix_ms, r.error, r.seq";

fn summary_row(row: &Row<'_>) -> rusqlite::Result<(RunSummary, Option<String>)> {
    let status: String = row.get(3)?;
    let trigger: String = row.get(4)?;
    Ok((
        RunSummary {
            id: row.get(0)?,
            workflow: row.get(1)?,
            workflow_version: row.get(2)?,
            status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
            trigger: TriggerKind::parse(&trigger),
            event_id: row.get(5)?,
            trace_id: row.get(6)?,
            created_unix_ms: row.get(7)?,
            started_unix_ms: row.get(8)?,
            finished_unix_ms: row.get(9)?,
            error: None,
            seq: row.get(11)?,
        },
        row.get(10)?,
    ))
}

fn with_error((mut summary, error): (RunSummary, Option<String>)) -> Result<RunSummary, DbError> {
    summary.error = error.as_deref().map(from_json).transpose()?;
    Ok(summary)
}

/// Every tenant's runs that finished at or after `since` (Unix ms): (tenant, run id).
pub(crate) fn finished_since(
    conn: &Connection,
    since: i64,
) -> Result<Vec<(String, String)>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT tenant, id FROM runs WHERE finished_unix_ms >= ?1 ORDER BY finished_unix_ms",
    )?;
    let rows = statement.query_map([since], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Runs of a tenant, newest first, filtered.
pub(crate) fn list_runs(
    conn: &Connection,
    tenant: &str,
    filter: &RunFilter,
) -> Result<Vec<RunSummary>, DbError> {
    let limit = filter.limit.unwrap_or(50).clamp(1, 500);
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS} FROM runs r
         WHERE r.tenant = ?1
           AND (?2 IS NULL OR r.workflow = ?2)
           AND (?3 IS NULL OR r.status = ?3)
           AND (?4 IS NULL OR r.created_unix_ms >= ?4)
           AND (?5 IS NULL OR r.created_unix_ms < ?5)
           AND (?6 IS NULL OR r.trace_id = ?6)
           AND (?7 IS NULL OR r.event_id = ?7)
           AND (?8 IS NULL OR r.seq < ?8)
           AND (?9 IS NULL OR r.seq > ?9)
         ORDER BY r.seq DESC LIMIT ?10"
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map(
        params![
            tenant,
            filter.workflow,
            filter.status.map(RunStatus::as_str),
            filter.since_unix_ms,
            filter.until_unix_ms,
            filter.trace_id,
            filter.event_id,
            filter.before,
            filter.after,
            limit,
        ],
        summary_row,
    )?;
    rows.map(|row| with_error(row?)).collect()
}

/// One run of a tenant, with its steps.
pub(crate) fn get_run(
    conn: &Connection,
    tenant: &str,
    run_id: &str,
) -> Result<Option<Run>, DbError> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, r.input, r.output, e.body, r.traceparent
         FROM runs r LEFT JOIN events e ON e.seq = r.event_seq
         WHERE r.id = ?1 AND r.tenant = ?2"
    );
    let row = conn
        .prepare_cached(&sql)?
        .query_row(params![run_id, tenant], |row| {
            Ok((
                summary_row(row)?,
                row.get::<_, String>(12)?,
                row.get::<_, Option<String>>(13)?,
                row.get::<_, Option<String>>(14)?,
                row.get::<_, String>(15)?,
            ))
        })
        .optional()?;
    let Some((summary, input, output, event, traceparent)) = row else {
        return Ok(None);
    };
    let summary = with_error(summary)?;
    let steps = steps(conn, summary.seq)?;
    Ok(Some(Run {
        summary,
        input: from_json(&input)?,
        output: output.as_deref().map(from_json).transpose()?,
        event: event.as_deref().map(from_json).transpose()?,
        traceparent,
        steps,
    }))
}

/// The summary of one run, by `seq`.
pub(crate) fn run_summary(
    conn: &Connection,
    run_seq: i64,
) -> Result<Option<(String, RunSummary)>, DbError> {
    let sql = format!("SELECT {SUMMARY_COLUMNS}, r.tenant FROM runs r WHERE r.seq = ?1");
    let row = conn
        .prepare_cached(&sql)?
        .query_row(params![run_seq], |row| {
            Ok((summary_row(row)?, row.get::<_, String>(12)?))
        })
        .optional()?;
    row.map(|(summary, tenant)| Ok((tenant, with_error(summary)?)))
        .transpose()
}

/// The summary of one run, by id.
pub(crate) fn run_summary_by_id(
    conn: &Connection,
    run_id: &str,
) -> Result<Option<(String, RunSummary)>, DbError> {
    let seq: Option<i64> = conn
        .prepare_cached("SELECT seq FROM runs WHERE id = ?1")?
        .query_row(params![run_id], |row| row.get(0))
        .optional()?;
    match seq {
        Some(seq) => run_summary(conn, seq),
        None => Ok(None),
    }
}

/// Dead letters of a tenant, newest first; replayed ones only when asked.
pub(crate) fn dead_letters(
    conn: &Connection,
    tenant: &str,
    include_replayed: bool,
    limit: u32,
) -> Result<Vec<DeadLetter>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT d.id, r.id, r.workflow, r.event_id, d.error, d.created_unix_ms, d.replayed_unix_ms
         FROM dead_letters d JOIN runs r ON r.seq = d.run_seq
         WHERE d.tenant = ?1 AND (?2 OR d.replayed_unix_ms IS NULL)
         ORDER BY d.id DESC LIMIT ?3",
    )?;
    let rows = statement.query_map(
        params![tenant, include_replayed, limit.clamp(1, 500)],
        |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<String>>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, i64>(5)?,
                row.get::<_, Option<i64>>(6)?,
            ))
        },
    )?;
    rows.map(|row| {
        let (id, run_id, workflow, event_id, error, created, replayed) = row?;
        Ok(DeadLetter {
            id,
            run_id,
            workflow,
            event_id,
            error: from_json(&error)?,
            created_unix_ms: created,
            replayed_unix_ms: replayed,
        })
    })
    .collect()
}

/// The run behind a tenant's dead letter.
pub(crate) fn dead_letter_run(
    conn: &Connection,
    tenant: &str,
    id: i64,
) -> Result<Option<String>, DbError> {
    Ok(conn
        .query_row(
            "SELECT r.id FROM dead_letters d JOIN runs r ON r.seq = d.run_seq WHERE d.id = ?1 AND d.tenant = ?2",
            params![id, tenant],
            |row| row.get(0),
        )
        .optional()?)
}

/// Runs waiting to start and runs under way, across tenants: the runner's backlog.
pub(crate) fn open_run_counts(conn: &Connection) -> Result<(u64, u64), DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT COUNT(*) FILTER (WHERE status = 'queued'),
                    COUNT(*) FILTER (WHERE status = 'running')
             FROM runs WHERE status IN ('queued', 'running')",
        )?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?)
}
