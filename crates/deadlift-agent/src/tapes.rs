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

use deadlift_engine::tape::{HostCall, Start, Tape};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::clock::now_ms;
use crate::policy::PolicyHandle;
use crate::store::{Database, DbError};
use crate::workflow::Journal;

/// Recorded calls waiting to be written; beyond, they are dropped (and counted).
const QUEUE: usize = 4096;
/// The largest tape stored (input, output and host-call arguments).
pub const MAX_TAPE_BYTES: usize = 1 << 20;
/// Calls recorded per second, per (tenant, module, function): the newest 1,000 tapes of
/// a module called 30,000 times a second are a few seconds of its traffic anyway, and
/// recording every call would cost the call path a third of its rate.
pub const RECORDED_PER_SECOND: u32 = 100;
/// Calls recorded per second for one tenant, whatever its number of modules: one tenant
/// cannot keep the journal's writer busy with its tapes.
pub const RECORDED_PER_SECOND_PER_TENANT: u32 = 300;
/// Calls recorded per second by the whole agent.
pub const RECORDED_PER_SECOND_IN_ALL: u32 = 1000;
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
    /// What the call started with: the instance's vars (hex) and the grant's config.
    #[serde(default, skip_serializing_if = "is_empty_start")]
    #[schema(value_type = Object)]
    pub start: Start,
    pub fuel_used: u64,
    pub duration_us: u64,
    pub created_unix_ms: i64,
}

fn is_empty_start(start: &Start) -> bool {
    *start == Start::default()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TapeError {
    pub code: String,
    pub message: String,
}

impl TapeError {
    pub fn of(error: &deadlift_engine::CallError) -> Self {
        Self {
            code: error.code().as_str().to_owned(),
            message: error.to_string(),
        }
    }
}

/// A call to record.
#[derive(Debug, Clone)]
pub struct Recording {
    pub tenant: String,
    /// The name the call used; `None` to take the module's own name (looked up by the
    /// writer, off the call path).
    pub module_name: Option<String>,
    pub module_id: String,
    pub function: String,
    pub input: Vec<u8>,
    pub outcome: Result<Vec<u8>, TapeError>,
    pub host_calls: Vec<HostCall>,
    pub start: Start,
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
    /// Per (tenant, module, function) hash: the current second and calls recorded in it.
    rate: parking_lot::Mutex<std::collections::HashMap<u64, (u64, u32)>>,
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
                        let mut written = std::collections::BTreeSet::new();
                        for recording in &writing {
                            let kept = policy.limits(&recording.tenant).tapes_kept;
                            if let Some(name) = insert(tx, recording, now, kept)? {
                                written.insert((
                                    recording.tenant.clone(),
                                    name,
                                    recording.function.clone(),
                                    kept,
                                ));
                            }
                        }
                        // Each series keeps its newest tapes: pruned once a batch.
                        for (tenant, name, function, kept) in written {
                            prune(tx, &tenant, &name, &function, kept)?;
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
            rate: parking_lot::Mutex::default(),
        }
    }

    /// A tape for a call about to start, if it is to be recorded: the tenant's calls are
    /// recorded, and this module's function has not had its share this second.
    pub fn tape_for(&self, tenant: &str, module: &str, function: &str) -> Option<Tape> {
        if !self.enabled(tenant) {
            return None;
        }
        use std::hash::{Hash, Hasher};
        let key = |parts: &dyn Fn(&mut std::collections::hash_map::DefaultHasher)| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            parts(&mut hasher);
            hasher.finish()
        };
        // Each series its share, each tenant its share of the writer, the agent a bound.
        let limits = [
            (
                key(&|h| (tenant, module, function).hash(h)),
                RECORDED_PER_SECOND,
            ),
            (
                key(&|h| ("tenant", tenant).hash(h)),
                RECORDED_PER_SECOND_PER_TENANT,
            ),
            (0, RECORDED_PER_SECOND_IN_ALL),
        ];
        let second = u64::try_from(now_ms() / 1000).unwrap_or(0);
        let mut rate = self.rate.lock();
        if rate.len() > 100_000 {
            rate.retain(|_, (at, _)| *at == second);
        }
        for (key, limit) in limits {
            let (at, count) = rate.entry(key).or_insert((second, 0));
            if *at != second {
                (*at, *count) = (second, 0);
            }
            if *count >= limit {
                return None;
            }
        }
        for (key, _) in limits {
            if let Some((_, count)) = rate.get_mut(&key) {
                *count += 1;
            }
        }
        Some(Tape::recording())
    }

    /// Whether calls of `tenant` are recorded.
    pub fn enabled(&self, tenant: &str) -> bool {
        self.policy.current().limits(tenant).tapes_kept > 0
    }

    /// Hands a call over to be stored; never waits. A call whose tape overflowed, or
    /// whose input and output together pass [`MAX_TAPE_BYTES`], is not stored (counted as
    /// dropped): a tenant's tapes take at most `tapes_kept` × that on disk per series.
    pub fn record(&self, recording: Recording, tape: &Tape) {
        let size = recording.input.len()
            + recording.outcome.as_ref().map_or(0, Vec::len)
            + recording
                .host_calls
                .iter()
                .map(|c| c.args.iter().map(Vec::len).sum::<usize>())
                .sum::<usize>()
            + recording.start.vars.values().map(Vec::len).sum::<usize>();
        if tape.overflowed() || size > MAX_TAPE_BYTES || self.queue.try_send(recording).is_err() {
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

/// Stores one tape; answers the module name it went under (none when not stored).
fn insert(
    conn: &Connection,
    recording: &Recording,
    now: i64,
    kept: u64,
) -> Result<Option<String>, DbError> {
    if kept == 0 {
        return Ok(None);
    }
    let module_name = match &recording.module_name {
        Some(name) => name.clone(),
        None => {
            let named: Option<String> = conn
                .prepare_cached("SELECT name FROM modules WHERE tenant = ?1 AND id = ?2")?
                .query_row(params![recording.tenant, recording.module_id], |row| {
                    row.get(0)
                })
                .optional()?;
            // The module went away meanwhile: nothing to replay against.
            let Some(name) = named else { return Ok(None) };
            name
        }
    };
    let (output, error) = match &recording.outcome {
        Ok(output) => (Some(hex::encode(output)), None),
        Err(error) => (None, Some(serde_json::to_string(error).map_err(corrupt)?)),
    };
    conn.prepare_cached(
        "INSERT INTO tapes (tenant, module_name, module_id, function, input, output, error,
            host_calls, fuel_used, duration_us, created_unix_ms, start)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        recording.tenant,
        module_name,
        recording.module_id,
        recording.function,
        hex::encode(&recording.input),
        output,
        error,
        serde_json::to_string(&recording.host_calls).map_err(corrupt)?,
        i64::try_from(recording.fuel_used).unwrap_or(i64::MAX),
        i64::try_from(recording.duration_us).unwrap_or(i64::MAX),
        now,
        if is_empty_start(&recording.start) {
            None
        } else {
            Some(serde_json::to_string(&recording.start).map_err(corrupt)?)
        },
    ])?;
    Ok(Some(module_name))
}

/// Keeps the newest `kept` tapes of a (tenant, module name, function).
fn prune(
    conn: &Connection,
    tenant: &str,
    name: &str,
    function: &str,
    kept: u64,
) -> Result<(), DbError> {
    conn.prepare_cached(
        "DELETE FROM tapes WHERE tenant = ?1 AND module_name = ?2 AND function = ?3
         AND id <= (SELECT id FROM tapes WHERE tenant = ?1 AND module_name = ?2 AND function = ?3
                    ORDER BY id DESC LIMIT 1 OFFSET ?4)",
    )?
    .execute(params![
        tenant,
        name,
        function,
        i64::try_from(kept).unwrap_or(i64::MAX)
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
                fuel_used, duration_us, created_unix_ms, start
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
                row.get::<_, Option<String>>(11)?,
            ))
        },
    )?;
    rows.map(|row| {
        let (
            id,
            module_name,
            module_id,
            function,
            input,
            output,
            error,
            calls,
            fuel,
            us,
            at,
            start,
        ) = row?;
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
            start: start
                .map(|s| serde_json::from_str(&s).map_err(corrupt))
                .transpose()?
                .unwrap_or_default(),
            fuel_used: u64::try_from(fuel).unwrap_or(0),
            duration_us: u64::try_from(us).unwrap_or(0),
            created_unix_ms: at,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant with many modules cannot record more than its share a second, and a
    /// series no more than its own.
    #[tokio::test]
    async fn recording_is_bounded_per_series_and_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("agent.db")).unwrap();
        let (journal, _receiver) = Journal::new(db.clone());
        let tapes = Tapes::start(
            db,
            journal,
            PolicyHandle::new(crate::policy::Policy::default()),
        );
        let recorded = |module: &str| {
            (0..RECORDED_PER_SECOND * 2)
                .filter(|_| tapes.tape_for("acme", module, "run").is_some())
                .count() as u32
        };
        // Within one second (the test takes milliseconds; a second boundary may reset
        // the counters once, which only makes the counts larger, never over twice).
        let one = recorded("m0");
        assert!(
            (RECORDED_PER_SECOND..=RECORDED_PER_SECOND * 2).contains(&one),
            "{one}"
        );
        let many: u32 = (1..20).map(|i| recorded(&format!("m{i}"))).sum::<u32>() + one;
        assert!(many <= RECORDED_PER_SECOND_PER_TENANT * 2, "{many}");
        assert!(
            tapes.tape_for("globex", "m0", "run").is_some(),
            "another tenant has its own share"
        );
    }
}
