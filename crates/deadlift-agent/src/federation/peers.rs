//! Peers and the outbox in SQL. A peer is another agent: its URL and public key, the
//! tenant whose events flow with it (sent from here, received into), and subject patterns
//! for what is sent and what is accepted. The outbox holds events waiting for delivery.
//! Outbox rows are written only inside the journal writer's transactions (its enqueue,
//! and the federation's writes submitted to it).

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::store::DbError;
use crate::workflow::event::CloudEvent;
use deadlift_engine::subject::SubjectPattern;

/// Another agent this one exchanges events with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Peer {
    pub name: String,
    /// The peer's base URL, e.g. `https://acme.example:8080`.
    pub url: String,
    /// Its Ed25519 public key, base64.
    pub public_key: String,
    /// The tenant whose events are sent to the peer and into which its events arrive;
    /// always named (no tenant is special).
    pub tenant: String,
    /// Subject patterns of events sent to the peer.
    #[serde(default)]
    pub send: Vec<String>,
    /// Subject patterns of events accepted from the peer.
    #[serde(default)]
    pub accept: Vec<String>,
    #[serde(default)]
    pub created_unix_ms: i64,
}

impl Peer {
    /// Checks the fields; the message says which and why.
    pub fn validate(&self) -> Result<(), String> {
        crate::workflow::spec::validate_name(&self.name).map_err(|e| format!("name: {e}"))?;
        let url = url::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("url: must be http or https".into());
        }
        super::parse_public_key(&self.public_key).map_err(|e| format!("public_key: {e}"))?;
        for (field, patterns) in [("send", &self.send), ("accept", &self.accept)] {
            for pattern in patterns {
                SubjectPattern::parse(pattern).map_err(|e| format!("{field}: {e}"))?;
            }
        }
        Ok(())
    }

    pub fn sends(&self, event_type: &str) -> bool {
        matches_any(&self.send, event_type)
    }

    pub fn accepts(&self, event_type: &str) -> bool {
        matches_any(&self.accept, event_type)
    }
}

fn matches_any(patterns: &[String], subject: &str) -> bool {
    patterns
        .iter()
        .filter_map(|p| SubjectPattern::parse(p).ok())
        .any(|p| p.matches(subject))
}

fn corrupt(e: serde_json::Error) -> DbError {
    DbError::Corrupt(e.to_string())
}

pub(crate) fn upsert_peer(conn: &Connection, peer: &Peer, now: i64) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO peers (name, url, public_key, tenant, send, accept, created_unix_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (name) DO UPDATE SET url = excluded.url, public_key = excluded.public_key,
            tenant = excluded.tenant, send = excluded.send, accept = excluded.accept",
        params![
            peer.name,
            peer.url,
            peer.public_key,
            peer.tenant,
            serde_json::to_string(&peer.send).map_err(corrupt)?,
            serde_json::to_string(&peer.accept).map_err(corrupt)?,
            now,
        ],
    )?;
    Ok(())
}

pub(crate) fn remove_peer(conn: &Connection, name: &str) -> Result<bool, DbError> {
    Ok(conn.execute("DELETE FROM peers WHERE name = ?1", [name])? > 0)
}

/// Deliveries waiting to be sent, to every peer.
pub(crate) fn pending(conn: &Connection) -> Result<u64, DbError> {
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")?
        .query_row([], |row| row.get(0))?)
}

pub(crate) fn list_peers(conn: &Connection) -> Result<Vec<Peer>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT name, url, public_key, tenant, send, accept, created_unix_ms FROM peers ORDER BY name",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, String>(5)?,
            row.get::<_, i64>(6)?,
        ))
    })?;
    rows.map(|row| {
        let (name, url, public_key, tenant, send, accept, created) = row?;
        Ok(Peer {
            name,
            url,
            public_key,
            tenant,
            send: serde_json::from_str(&send).map_err(corrupt)?,
            accept: serde_json::from_str(&accept).map_err(corrupt)?,
            created_unix_ms: created,
        })
    })
    .collect()
}

pub(crate) fn get_peer(conn: &Connection, name: &str) -> Result<Option<Peer>, DbError> {
    Ok(list_peers(conn)?.into_iter().find(|p| p.name == name))
}

/// Queues an event for a peer (once per peer and event id).
pub(crate) fn enqueue(
    conn: &Connection,
    peer: &str,
    event: &CloudEvent,
    now: i64,
) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO outbox (peer, event_id, body, status, next_attempt_unix_ms, created_unix_ms)
         VALUES (?1, ?2, ?3, 'pending', ?4, ?4)",
    )?
    .execute(params![
        peer,
        event.id,
        serde_json::to_string(event).map_err(corrupt)?,
        now
    ])?;
    Ok(())
}

/// Where an outbox entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    /// Waiting for its (next) attempt.
    Pending,
    Delivered,
    /// Retries exhausted or refused by the peer; can be replayed.
    Dead,
    /// Handed to the cluster's outbox (cluster mode): whichever agent holds the peer's
    /// lease delivers it, and records the outcome in its own outbox.
    Forwarded,
}

impl OutboxStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
            Self::Forwarded => "forwarded",
        }
    }
}

impl std::str::FromStr for OutboxStatus {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [Self::Pending, Self::Delivered, Self::Dead, Self::Forwarded]
            .into_iter()
            .find(|status| status.as_str() == text)
            .ok_or_else(|| format!("`{text}` is not pending, delivered, dead or forwarded"))
    }
}

/// An event waiting for (or done with) delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct OutboxEntry {
    pub id: i64,
    pub peer: String,
    pub event_id: String,
    pub status: OutboxStatus,
    pub attempts: i64,
    pub next_attempt_unix_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_unix_ms: i64,
    #[serde(skip)]
    pub body: String,
}

fn entries(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<OutboxEntry>, DbError> {
    let mut statement = conn.prepare_cached(sql)?;
    let rows = statement.query_map(params, |row| {
        Ok(OutboxEntry {
            id: row.get(0)?,
            peer: row.get(1)?,
            event_id: row.get(2)?,
            status: row.get::<_, String>(3)?.parse().map_err(|e: String| {
                rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, e.into())
            })?,
            attempts: row.get(4)?,
            next_attempt_unix_ms: row.get(5)?,
            last_error: row.get(6)?,
            created_unix_ms: row.get(7)?,
            body: row.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

const ENTRY_COLUMNS: &str =
    "id, peer, event_id, status, attempts, next_attempt_unix_ms, last_error, created_unix_ms, body";

/// Pending entries due by `now`, oldest first.
pub(crate) fn due(conn: &Connection, now: i64, limit: u32) -> Result<Vec<OutboxEntry>, DbError> {
    entries(
        conn,
        &format!(
            "SELECT {ENTRY_COLUMNS} FROM outbox WHERE status = 'pending' AND next_attempt_unix_ms <= ?1 ORDER BY next_attempt_unix_ms, id LIMIT ?2"
        ),
        params![now, limit],
    )
}

/// The outbox, newest first, optionally of one status.
pub(crate) fn list(
    conn: &Connection,
    status: Option<OutboxStatus>,
    limit: u32,
) -> Result<Vec<OutboxEntry>, DbError> {
    let status = status.map(OutboxStatus::as_str);
    entries(
        conn,
        &format!(
            "SELECT {ENTRY_COLUMNS} FROM outbox WHERE ?1 IS NULL OR status = ?1 ORDER BY id DESC LIMIT ?2"
        ),
        params![status, limit.clamp(1, 1000)],
    )
}

/// The earliest next attempt among pending entries.
pub(crate) fn next_due(conn: &Connection) -> Result<Option<i64>, DbError> {
    Ok(conn
        .query_row(
            "SELECT MIN(next_attempt_unix_ms) FROM outbox WHERE status = 'pending'",
            [],
            |row| row.get::<_, Option<i64>>(0),
        )
        .optional()?
        .flatten())
}

/// Records the outcome of an attempt.
pub(crate) fn record_attempt(
    conn: &Connection,
    id: i64,
    outcome: &Attempt,
    now: i64,
) -> Result<(), DbError> {
    match outcome {
        Attempt::Delivered => conn.prepare_cached(
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_unix_ms = ?2, last_error = NULL WHERE id = ?1",
        )?
        .execute(params![id, now])?,
        Attempt::Retry { error, next_unix_ms } => conn.prepare_cached(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_unix_ms = ?3 WHERE id = ?1",
        )?
        .execute(params![id, error, next_unix_ms])?,
        Attempt::Dead { error } => conn.prepare_cached(
            "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_error = ?2 WHERE id = ?1",
        )?
        .execute(params![id, error])?,
    };
    Ok(())
}

/// Marks entries handed to the cluster's outbox.
pub(crate) fn mark_forwarded(conn: &Connection, ids: &[i64]) -> Result<(), DbError> {
    let mut statement = conn.prepare_cached(
        "UPDATE outbox SET status = 'forwarded' WHERE id = ?1 AND status = 'pending'",
    )?;
    for id in ids {
        statement.execute([id])?;
    }
    Ok(())
}

/// Whether an entry of this tenant's event still waits to be handed to the cluster's
/// outbox.
pub(crate) fn unforwarded(
    conn: &Connection,
    tenant: &str,
    event_id: &str,
) -> Result<bool, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM outbox o JOIN peers p ON p.name = o.peer
             WHERE o.event_id = ?1 AND p.tenant = ?2 AND o.status = 'pending' LIMIT 1",
        )?
        .query_row(params![event_id, tenant], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Records the outcome of a cluster delivery attempt made here, on this agent's entry for
/// the same peer and event (made if the event entered the cluster elsewhere). `attempts`
/// counts every agent's attempts.
pub(crate) fn record_cluster_attempt(
    conn: &Connection,
    entry: &OutboxEntry,
    outcome: &Attempt,
    now: i64,
) -> Result<(), DbError> {
    let (status, error, next, delivered) = match outcome {
        Attempt::Delivered => ("delivered", None, now, Some(now)),
        Attempt::Retry {
            error,
            next_unix_ms,
        } => ("forwarded", Some(error.as_str()), *next_unix_ms, None),
        Attempt::Dead { error } => ("dead", Some(error.as_str()), now, None),
    };
    conn.prepare_cached(
        "INSERT INTO outbox (peer, event_id, body, status, attempts, next_attempt_unix_ms, last_error,
            created_unix_ms, delivered_unix_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (peer, event_id) DO UPDATE SET status = excluded.status,
            attempts = excluded.attempts, next_attempt_unix_ms = excluded.next_attempt_unix_ms,
            last_error = excluded.last_error, delivered_unix_ms = excluded.delivered_unix_ms",
    )?
    .execute(params![
        entry.peer,
        entry.event_id,
        entry.body,
        status,
        entry.attempts + 1,
        next,
        error,
        entry.created_unix_ms,
        delivered,
    ])?;
    Ok(())
}

/// Puts a dead entry back in line. False when it is not dead.
pub(crate) fn replay(conn: &Connection, id: i64, now: i64) -> Result<bool, DbError> {
    Ok(conn.execute(
        "UPDATE outbox SET status = 'pending', next_attempt_unix_ms = ?2, created_unix_ms = ?2 WHERE id = ?1 AND status = 'dead'",
        params![id, now],
    )? > 0)
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    Retry { error: String, next_unix_ms: i64 },
    Dead { error: String },
}

/// Forgets delivered entries older than `before` (they are kept as long as event ids
/// are, for the record).
pub(crate) fn prune_delivered(conn: &Connection, before: i64) -> Result<usize, DbError> {
    Ok(conn
        .prepare_cached("DELETE FROM outbox WHERE status = 'delivered' AND delivered_unix_ms < ?1")?
        .execute([before])?)
}
