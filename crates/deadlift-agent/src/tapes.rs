//! Tapes kept by the agent: what a call through the API received, answered and asked of
//! the host (the engine's [`Tape`]), per tenant, module name and function, so that a new
//! version of a plug-in can be replayed on real traffic before it goes live.
//!
//! Recording never waits: a recorded call is handed to a task over a bounded queue (a
//! full queue drops it, counted) and written in batches through the journal. Each
//! (tenant, module name, function) keeps its most recent tapes, as many as the
//! operator's policy says for the tenant (`tapes_kept`; 0 records nothing). Tapes are the
//! tenant's data: read only for it, and deleted with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadlift_engine::tape::HostCall;
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::clock::now_ms;
use crate::policy::PolicyHandle;
use crate::store::{Database, DbError};
use crate::workflow::Journal;

/// Recorded calls waiting to be written; beyond, they are dropped (and counted).
const QUEUE: usize = 4096;
/// Most tapes written in one transaction.
const BATCH: usize = 256;

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredTape {
    pub id: i64,
    pub module_name: String,
    /// The module that answered (`sha256:…`).
    pub module_id: String,
    pub function: String,
    /// Input bytes, hex.
    pub input: String,
    /// Output bytes, hex, when the call succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The error code and message, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TapeError>,
    #[schema(value_type = Vec<Object>)]
    pub host_calls: Vec<HostCall>,
    pub fuel_used: u64,
    pub duration_us: u64,
    pub created_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TapeError {
    pub code: String,
    pub message: String,
}

/// A call to record.
#[derive(Debug, Clone)]
pub struct Recording {
    pub tenant: String,
    pub module_name: String,
    pub module_id: String,
    pub function: String,
    pub input: Vec<u8>,
    pub outcome: Result<Vec<u8>, TapeError>,
    pub host_calls: Vec<HostCall>,
    pub fuel_used: u64,
    pub duration_us: u64,
}

/// Which tapes to read.
#[derive(Debug, Clone, Default)]
pub struct TapeFilter {
    pub function: Option<String>,
    /// At most this many, the newest (default 100, at most 1,000).
    pub last: Option<u32>,
    /// Only tapes recorded at or after this time (Unix ms).
    pub since_unix_ms: Option<i64>,
}

/// The agent's tapes.
#[derive(Debug)]
pub struct Tapes {
    queue: mpsc::Sender<Recording>,
    db: Database,
    policy: PolicyHandle,
    dropped: Arc<AtomicU64>,
}

impl Tapes {
    /// Starts the writer task. Needs a Tokio runtime.
    pub(crate) fn start(db: Database, journal: Journal, policy: PolicyHandle) -> Self {
        let (queue, mut recorded) = mpsc::channel::<Recording>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let (writer_policy, writer_dropped) = (policy.clone(), dropped.clone());
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while recorded.recv_many(&mut batch, BATCH).await > 0 {
                let writing = std::mem::take(&mut batch);
                let count = writing.len() as u64;
                let policy = writer_policy.current();
                let now = now_ms();
                let written = journal
                    .write(move |tx| {
                        for recording in &writing {
                            let kept = policy.limits(&recording.tenant).tapes_kept;
                            insert(tx, recording, now, kept)?;
                        }
                        Ok(())
                    })
                    .await;
                if let Err(error) = written {
                    tracing::warn!(%error, tapes = count, "could not store tapes; dropped");
                    writer_dropped.fetch_add(count, Ordering::Relaxed);
                }
            }
        });
        Self {
            queue,
            db,
            policy,
            dropped,
        }
    }

    /// Whether calls of `tenant` are recorded.
    pub fn enabled(&self, tenant: &str) -> bool {
        self.policy.current().limits(tenant).tapes_kept > 0
    }

    /// Hands a call over to be stored; never waits.
    pub fn record(&self, recording: Recording) {
        if self.queue.try_send(recording).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Recorded calls dropped (queue full, or a failed write).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// `tenant`'s tapes of module `name`, newest first.
    pub async fn list(
        &self,
        tenant: &str,
        name: &str,
        filter: TapeFilter,
    ) -> Result<Vec<StoredTape>, DbError> {
        let db = self.db.clone();
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        tokio::task::spawn_blocking(move || list(&db.read(), &tenant, &name, &filter)).await?
    }
}

fn corrupt(e: impl std::fmt::Display) -> DbError {
    DbError::Corrupt(e.to_string())
}

fn insert(conn: &Connection, recording: &Recording, now: i64, kept: u64) -> Result<(), DbError> {
    if kept == 0 {
        return Ok(());
    }
    let (output, error) = match &recording.outcome {
        Ok(output) => (Some(hex::encode(output)), None),
        Err(error) => (None, Some(serde_json::to_string(error).map_err(corrupt)?)),
    };
    conn.prepare_cached(
        "INSERT INTO tapes (tenant, module_name, module_id, function, input, output, error,
            host_calls, fuel_used, duration_us, created_unix_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        recording.tenant,
        recording.module_name,
        recording.module_id,
        recording.function,
        hex::encode(&recording.input),
        output,
        error,
        serde_json::to_string(&recording.host_calls).map_err(corrupt)?,
        i64::try_from(recording.fuel_used).unwrap_or(i64::MAX),
        i64::try_from(recording.duration_us).unwrap_or(i64::MAX),
        now,
    ])?;
    // Keep the newest `kept` of this (tenant, module name, function).
    conn.prepare_cached(
        "DELETE FROM tapes WHERE tenant = ?1 AND module_name = ?2 AND function = ?3
         AND id <= (SELECT id FROM tapes WHERE tenant = ?1 AND module_name = ?2 AND function = ?3
                    ORDER BY id DESC LIMIT 1 OFFSET ?4)",
    )?
    .execute(params![
        recording.tenant,
        recording.module_name,
        recording.function,
        i64::try_from(kept).unwrap_or(i64::MAX),
    ])?;
    Ok(())
}

fn list(
    conn: &Connection,
    tenant: &str,
    name: &str,
    filter: &TapeFilter,
) -> Result<Vec<StoredTape>, DbError> {
    let limit = filter.last.unwrap_or(100).clamp(1, 1000);
    let mut statement = conn.prepare_cached(
        "SELECT id, module_name, module_id, function, input, output, error, host_calls,
                fuel_used, duration_us, created_unix_ms
         FROM tapes WHERE tenant = ?1 AND module_name = ?2
           AND (?3 IS NULL OR function = ?3) AND (?4 IS NULL OR created_unix_ms >= ?4)
         ORDER BY id DESC LIMIT ?5",
    )?;
    let rows = statement.query_map(
        params![tenant, name, filter.function, filter.since_unix_ms, limit],
        |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, Option<String>>(5)?,
                row.get::<_, Option<String>>(6)?,
                row.get::<_, String>(7)?,
                row.get::<_, i64>(8)?,
                row.get::<_, i64>(9)?,
                row.get::<_, i64>(10)?,
            ))
        },
    )?;
    rows.map(|row| {
        let (id, module_name, module_id, function, input, output, error, calls, fuel, us, at) =
            row?;
        Ok(StoredTape {
            id,
            module_name,
            module_id,
            function,
            input,
            output,
            error: error
                .map(|e| serde_json::from_str(&e).map_err(corrupt))
                .transpose()?,
            host_calls: serde_json::from_str(&calls).map_err(corrupt)?,
            fuel_used: u64::try_from(fuel).unwrap_or(0),
            duration_us: u64::try_from(us).unwrap_or(0),
            created_unix_ms: at,
        })
    })
    .collect()
}
