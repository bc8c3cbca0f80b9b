//! Views into peers' agents: a tenant that also holds a token on a peer's agent stores it
//! here (per peer), and the agent uses it to fetch that side's runs of a trace, so one
//! trace can be seen across organisations. The token is the tenant's credential on the
//! other agent: it is never answered back, and it is used only for the tenant that stored
//! it while the peer still serves that tenant (an admin who moves a peer to another
//! tenant does not hand the new tenant the old one's token).

use std::time::Duration;

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use super::peers::Peer;
use crate::store::DbError;
use crate::workflow::Run;

/// The most a peer's answer may weigh; a larger one is reported, not read.
pub const MAX_VIEW_BYTES: usize = 8 << 20;
/// How long a peer has to answer.
pub const VIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// A trace as one agent sees it: its runs for the asking tenant, and (when asked) each
/// viewable peer's runs of the same trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TraceView {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// The agent that answered.
    pub agent: String,
    /// This agent's runs in the trace, oldest first (at most 100).
    pub runs: Vec<Run>,
    /// Peers of the tenant with a stored view token, each with its side of the trace.
    #[serde(default)]
    pub peers: Vec<PeerTrace>,
}

/// A peer's side of a trace, or why it could not be fetched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerTrace {
    pub peer: String,
    /// The agent that answered for the peer, as it names itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default)]
    pub runs: Vec<Run>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<PeerTraceError>,
}

/// Why a peer's side of a trace is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerTraceError {
    /// The peer's error code when it answered with one; `peer_unreachable` otherwise.
    pub code: String,
    pub message: String,
}

/// Whether a peer has a view token, as a tenant may see it (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerView {
    pub peer: String,
    pub url: String,
    pub updated_unix_ms: i64,
}

pub(crate) fn set_token(
    conn: &Connection,
    peer: &str,
    tenant: &str,
    token: &str,
    now: i64,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO peer_views (peer, tenant, token, updated_unix_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (peer) DO UPDATE SET tenant = excluded.tenant, token = excluded.token,
            updated_unix_ms = excluded.updated_unix_ms",
        params![peer, tenant, token, now],
    )?;
    Ok(())
}

pub(crate) fn remove_token(conn: &Connection, peer: &str, tenant: &str) -> Result<bool, DbError> {
    Ok(conn.execute(
        "DELETE FROM peer_views WHERE peer = ?1 AND tenant = ?2",
        params![peer, tenant],
    )? > 0)
}

/// The tenant's view tokens, by peer name, with when each was stored.
pub(crate) fn tokens(
    conn: &Connection,
    tenant: &str,
) -> Result<Vec<(String, String, i64)>, DbError> {
    let mut statement = conn.prepare_cached(
        "SELECT peer, token, updated_unix_ms FROM peer_views WHERE tenant = ?1 ORDER BY peer",
    )?;
    let rows = statement.query_map([tenant], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Fetches `peer`'s side of a trace with the tenant's token there. Never fails: what went
/// wrong is the answer's `error`.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    peer: &Peer,
    token: &str,
    trace_id: &str,
) -> PeerTrace {
    let mut side = PeerTrace {
        peer: peer.name.clone(),
        agent: None,
        runs: Vec::new(),
        error: None,
    };
    match fetch_view(http, peer, token, trace_id).await {
        Ok(view) => {
            side.agent = Some(view.agent);
            // The peer is another organisation: keep only what was asked for.
            side.runs = view
                .runs
                .into_iter()
                .filter(|run| run.summary.trace_id == trace_id)
                .collect();
        }
        Err(error) => side.error = Some(error),
    }
    side
}

async fn fetch_view(
    http: &reqwest::Client,
    peer: &Peer,
    token: &str,
    trace_id: &str,
) -> Result<TraceView, PeerTraceError> {
    let unreachable = |message: String| PeerTraceError {
        code: "peer_unreachable".into(),
        message,
    };
    let url = format!(
        "{}/v1/traces/{trace_id}?peers=false",
        peer.url.trim_end_matches('/')
    );
    let mut response = http
        .get(url)
        .bearer_auth(token)
        .timeout(VIEW_TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable(format!("asking peer `{}`: {e}", peer.name)))?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| unreachable(format!("reading peer `{}`: {e}", peer.name)))?
    {
        if body.len() + chunk.len() > MAX_VIEW_BYTES {
            return Err(unreachable(format!(
                "peer `{}` answered more than {MAX_VIEW_BYTES} bytes",
                peer.name
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        // Pass on the peer's own error when it has our shape.
        let error = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let code = v["error"]["code"].as_str()?.to_owned();
                let message = v["error"]["message"].as_str()?.to_owned();
                Some(PeerTraceError {
                    code,
                    message: format!("peer `{}` answered {status}: {message}", peer.name),
                })
            });
        return Err(
            error.unwrap_or_else(|| unreachable(format!("peer `{}` answered {status}", peer.name)))
        );
    }
    serde_json::from_slice(&body).map_err(|e| {
        unreachable(format!(
            "peer `{}` answered something that is not a trace: {e}",
            peer.name
        ))
    })
}
