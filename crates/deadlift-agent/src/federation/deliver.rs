//! The deliverer: sends outbox entries to their peers, signed, and records each attempt
//! through the journal writer. A refused delivery (400, 401, 403, 404, 413) will not
//! succeed by itself and is dead at once. Other failures (network, 5xx, 408, 429) are
//! retried with exponential backoff and jitter until the horizon. Dead entries can be
//! replayed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::peers::{self, Attempt, OutboxEntry, Peer};
use super::{Identity, PEER_HEADER};
use crate::clock::now_ms;
use crate::store::Database;
use crate::workflow::event::random_fraction;

/// Settings of delivery.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// How long an event is retried before it is dead.
    pub horizon: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            horizon: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(300),
            concurrency: 16,
        }
    }
}

/// Records an attempt's outcome; implemented by the journal writer's handle.
pub(crate) type Recorder =
    Arc<dyn Fn(Vec<i64>, Attempt) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// Runs until the task is aborted.
pub(crate) async fn run(
    db: Database,
    identity: Identity,
    record: Recorder,
    wake: Arc<Notify>,
    config: DeliveryConfig,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(http) => http,
        Err(error) => {
            tracing::error!(%error, "cannot build the delivery HTTP client; no deliveries");
            return;
        }
    };
    loop {
        let reader = db.clone();
        let now = now_ms();
        let loaded = tokio::task::spawn_blocking(move || {
            let conn = reader.read();
            Ok::<_, crate::store::DbError>((
                peers::due(&conn, now, 256)?,
                peers::list_peers(&conn)?,
                peers::next_due(&conn)?,
            ))
        })
        .await;
        let (due, known, next) = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read the outbox");
                (Vec::new(), Vec::new(), None)
            }
            Err(_) => return,
        };
        if due.is_empty() {
            let wait = next.map_or(Duration::from_secs(1), |at| {
                Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0))
            });
            tokio::select! {
                () = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
                () = wake.notified() => {}
            }
            continue;
        }
        let mut sending = tokio::task::JoinSet::new();
        for batch in batches(due) {
            while sending.len() >= config.concurrency.max(1) {
                sending.join_next().await;
            }
            let peer = known.iter().find(|p| p.name == batch[0].peer).cloned();
            let (http, identity, record, config) = (
                http.clone(),
                identity.clone(),
                record.clone(),
                config.clone(),
            );
            sending.spawn(async move {
                let outcome = attempt(&http, &identity, peer.as_ref(), &batch, &config).await;
                if let Attempt::Dead { error } = &outcome {
                    tracing::warn!(peer = %batch[0].peer, events = batch.len(), %error, "delivery dead-lettered");
                }
                record(batch.iter().map(|e| e.id).collect(), outcome).await;
            });
        }
        while sending.join_next().await.is_some() {}
    }
}

/// Most events one delivery carries.
const MAX_BATCH_EVENTS: usize = 100;
/// Most bytes of events one delivery carries (a single larger event goes alone).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Due entries grouped by peer, in order, into batches.
fn batches(due: Vec<OutboxEntry>) -> Vec<Vec<OutboxEntry>> {
    let mut by_peer: Vec<Vec<Vec<OutboxEntry>>> = Vec::new();
    let mut peers: Vec<String> = Vec::new();
    for entry in due {
        let index = match peers.iter().position(|p| *p == entry.peer) {
            Some(index) => index,
            None => {
                peers.push(entry.peer.clone());
                by_peer.push(vec![Vec::new()]);
                peers.len() - 1
            }
        };
        let batches = &mut by_peer[index];
        let last = batches.last_mut().filter(|b| {
            b.len() < MAX_BATCH_EVENTS
                && b.iter().map(|e| e.body.len()).sum::<usize>() + entry.body.len()
                    <= MAX_BATCH_BYTES
        });
        match last {
            Some(batch) => batch.push(entry),
            None => batches.push(vec![entry]),
        }
    }
    by_peer
        .into_iter()
        .flatten()
        .filter(|b| !b.is_empty())
        .collect()
}

/// One delivery attempt of a batch (one event is sent as a structured CloudEvent, more
/// as a CloudEvents batch).
async fn attempt(
    http: &reqwest::Client,
    identity: &Identity,
    peer: Option<&Peer>,
    batch: &[OutboxEntry],
    config: &DeliveryConfig,
) -> Attempt {
    let Some(entry) = batch.first() else {
        return Attempt::Delivered;
    };
    let Some(peer) = peer else {
        return Attempt::Dead {
            error: format!("no peer named `{}`", entry.peer),
        };
    };
    let (id, body, content_type) = match batch {
        [one] => (
            one.event_id.clone(),
            one.body.clone(),
            "application/cloudevents+json",
        ),
        many => {
            let bodies: Vec<&str> = many.iter().map(|e| e.body.as_str()).collect();
            (
                format!("batch_{}_{}", entry.event_id, many.len()),
                format!("[{}]", bodies.join(",")),
                crate::workflow::event::BATCH_CONTENT_TYPE,
            )
        }
    };
    let timestamp = now_ms() / 1000;
    let url = format!("{}/v1/peer/events", peer.url.trim_end_matches('/'));
    let sent = http
        .post(&url)
        .header("content-type", content_type)
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            identity.sign(&id, timestamp, body.as_bytes()),
        )
        .header(PEER_HEADER, &identity.name)
        .body(body)
        .send()
        .await;
    let error = match sent {
        Ok(response) if response.status().is_success() => return Attempt::Delivered,
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            let error = format!(
                "{url} answered {status}: {}",
                body.chars().take(300).collect::<String>()
            );
            if matches!(status, 400 | 401 | 403 | 404 | 413) {
                return Attempt::Dead { error };
            }
            error
        }
        Err(e) => format!("{url}: {e}"),
    };
    let oldest = batch
        .iter()
        .map(|e| e.created_unix_ms)
        .min()
        .unwrap_or(entry.created_unix_ms);
    let attempts = batch.iter().map(|e| e.attempts).max().unwrap_or(0);
    let age = Duration::from_millis(u64::try_from(now_ms() - oldest).unwrap_or(0));
    if age >= config.horizon {
        return Attempt::Dead {
            error: format!("gave up after {} attempts: {error}", attempts + 1),
        };
    }
    let doublings = u32::try_from(attempts).unwrap_or(u32::MAX).min(20);
    let backoff = config
        .initial_backoff
        .saturating_mul(1 << doublings)
        .min(config.max_backoff)
        .mul_f64(0.5 + random_fraction() / 2.0);
    Attempt::Retry {
        error,
        next_unix_ms: now_ms() + i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX / 2),
    }
}
