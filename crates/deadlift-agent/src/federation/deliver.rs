//! The deliverer: sends outbox entries to their peers, signed ([`Webhook`]), and records
//! each attempt through the journal. A refused delivery (400, 401, 403, 404, 413) will not
//! succeed by itself and is dead at once. Other failures (network, 5xx, 408, 429) are
//! retried with exponential backoff and jitter until the horizon. Dead entries can be
//! replayed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::peers::{self, Attempt, OutboxEntry, Peer};
use super::{Identity, PeerDirectory, Webhook};
use crate::clock::now_ms;
use crate::store::Database;
use crate::workflow::Journal;
use crate::workflow::event::random_fraction;

/// How often delivered entries past their keeping time are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Settings of delivery.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// How long an event is retried before it is dead.
    pub horizon: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// How long delivered entries are kept, for the record. An agent sets it to its
    /// retention's dedupe window, so entries live as long as the event ids they name.
    pub keep_delivered: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            horizon: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(300),
            concurrency: 16,
            keep_delivered: Duration::from_secs(24 * 3600),
        }
    }
}

/// Where due entries go in cluster mode instead of to their peers: the cluster's outbox,
/// from which whichever agent holds a peer's lease delivers them.
#[async_trait::async_trait]
pub trait OutboxForwarder: Send + Sync + std::fmt::Debug {
    /// Stores the entries in the cluster; answers once it holds every one.
    async fn forward(&self, entries: &[OutboxEntry]) -> Result<(), String>;
}

/// The forwarder, once the agent has joined a cluster.
pub(crate) type Forwarding = Arc<std::sync::OnceLock<Arc<dyn OutboxForwarder>>>;

/// The deliveries' HTTP client: a deadline per attempt, and no redirects (a delivery is
/// signed for its peer's URL). `None`, logged, when it cannot be built.
pub(crate) fn http_client() -> Option<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .inspect_err(
            |error| tracing::error!(%error, "cannot build the delivery HTTP client; no deliveries"),
        )
        .ok()
}

/// Runs until the task is aborted.
pub(crate) async fn run(
    db: Database,
    identity: Identity,
    journal: Journal,
    directory: PeerDirectory,
    wake: Arc<Notify>,
    config: DeliveryConfig,
    forwarding: Forwarding,
) {
    let Some(http) = http_client() else {
        return;
    };
    let mut pruned = Instant::now();
    loop {
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            prune(&journal, &config).await;
        }
        let reader = db.clone();
        let now = now_ms();
        let loaded = tokio::task::spawn_blocking(move || {
            let conn = reader.read();
            Ok::<_, crate::store::DbError>((peers::due(&conn, now, 256)?, peers::next_due(&conn)?))
        })
        .await;
        let (due, next) = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read the outbox");
                (Vec::new(), None)
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
        if let Some(forwarder) = forwarding.get() {
            forward(forwarder.as_ref(), &journal, due).await;
            continue;
        }
        let mut sending = tokio::task::JoinSet::new();
        for batch in batches(due) {
            while sending.len() >= config.concurrency.max(1) {
                sending.join_next().await;
            }
            let peer = directory.get(&batch[0].peer);
            let (http, identity, journal, config) = (
                http.clone(),
                identity.clone(),
                journal.clone(),
                config.clone(),
            );
            sending.spawn(async move {
                let (outcome, refused) =
                    attempt(&http, &identity, peer.as_ref(), &batch, &config).await;
                if let Attempt::Dead { error } = &outcome {
                    tracing::warn!(peer = %batch[0].peer, events = batch.len(), error = %error.escape_debug(), "delivery dead-lettered");
                }
                // Events the peer refused one by one are dead, each with its reason; the
                // rest of the batch had the batch's outcome. One write for all of them.
                let outcomes = batch
                    .iter()
                    .map(|entry| {
                        let attempt = match refused.iter().find(|r| r.id == entry.event_id) {
                            Some(refusal) => Attempt::Dead {
                                error: format!("refused by the peer: {}", refusal.message),
                            },
                            None => outcome.clone(),
                        };
                        (entry.id, attempt)
                    })
                    .collect();
                record(&journal, outcomes).await;
            });
        }
        while sending.join_next().await.is_some() {}
    }
}

/// Hands due entries to the cluster's outbox and marks them forwarded; on failure they
/// stay pending and are tried again after a moment.
async fn forward(forwarder: &dyn OutboxForwarder, journal: &Journal, due: Vec<OutboxEntry>) {
    if let Err(error) = forwarder.forward(&due).await {
        tracing::warn!(%error, "cannot hand the outbox to the cluster; trying again");
        tokio::time::sleep(Duration::from_secs(1)).await;
        return;
    }
    let ids: Vec<i64> = due.iter().map(|entry| entry.id).collect();
    if let Err(error) = journal
        .write(move |tx| peers::mark_forwarded(tx, &ids))
        .await
    {
        // Handed over but not marked: handed over again, which the cluster drops.
        tracing::warn!(%error, "cannot mark outbox entries forwarded");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Records a cluster delivery attempt's outcome for each entry, then counts them.
pub(crate) async fn record_cluster(journal: &Journal, outcomes: Vec<(OutboxEntry, Attempt)>) {
    let now = now_ms();
    let written = journal
        .write(move |tx| {
            for (entry, attempt) in &outcomes {
                peers::record_cluster_attempt(tx, entry, attempt, now)?;
            }
            Ok(outcomes)
        })
        .await;
    match written {
        Ok(outcomes) => count(journal, outcomes.into_iter().map(|(_, attempt)| attempt)),
        Err(error) => tracing::warn!(%error, "cannot record a delivery attempt"),
    }
}

fn count(journal: &Journal, attempts: impl Iterator<Item = Attempt>) {
    let stats = journal.stats();
    for attempt in attempts {
        let counter = match attempt {
            Attempt::Delivered => &stats.deliveries_done,
            Attempt::Retry { .. } => &stats.deliveries_retried,
            Attempt::Dead { .. } => &stats.deliveries_dead,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Records each entry's attempt outcome in one write, then counts them.
async fn record(journal: &Journal, outcomes: Vec<(i64, Attempt)>) {
    let now = now_ms();
    let written = journal
        .write(move |tx| {
            for (id, attempt) in &outcomes {
                peers::record_attempt(tx, *id, attempt, now)?;
            }
            Ok(outcomes)
        })
        .await;
    match written {
        Ok(outcomes) => count(journal, outcomes.into_iter().map(|(_, attempt)| attempt)),
        Err(error) => tracing::warn!(%error, "cannot record a delivery attempt"),
    }
}

/// Forgets delivered entries older than the keeping time.
async fn prune(journal: &Journal, config: &DeliveryConfig) {
    let keep = i64::try_from(config.keep_delivered.as_millis()).unwrap_or(i64::MAX);
    let before = now_ms().saturating_sub(keep);
    if let Err(error) = journal
        .write(move |tx| peers::prune_delivered(tx, before))
        .await
    {
        tracing::warn!(%error, "cannot prune delivered outbox entries");
    }
}

/// Most events one delivery carries.
const MAX_BATCH_EVENTS: usize = 100;
/// Most bytes of events one delivery carries (a single larger event goes alone).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Due entries grouped by peer, in order, into batches.
pub(crate) fn batches(due: Vec<OutboxEntry>) -> Vec<Vec<OutboxEntry>> {
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

/// The `webhook-id` of a delivery: the same for every retry of the same events, and
/// free of `.` (the signed content joins id, timestamp and body with dots). One event
/// whose id has no dot keeps its id, as agents before this rule expect.
fn webhook_id(batch: &[OutboxEntry]) -> String {
    use sha2::{Digest, Sha256};
    if let [one] = batch
        && !one.event_id.contains('.')
    {
        return one.event_id.clone();
    }
    let mut hash = Sha256::new();
    for entry in batch {
        hash.update(entry.peer.as_bytes());
        hash.update([0]);
        hash.update(entry.event_id.as_bytes());
        hash.update([0]);
    }
    format!("msg_{}", hex::encode(&hash.finalize()[..16]))
}

/// What a peer's successful answer may carry: the events it refused one by one.
#[derive(Debug, Default, serde::Deserialize)]
struct Answer {
    #[serde(default)]
    refused: Vec<super::Refused>,
}

/// One delivery attempt of a batch (one event is sent as a structured CloudEvent, more
/// as a CloudEvents batch): its outcome, and the events the peer refused one by one.
pub(crate) async fn attempt(
    http: &reqwest::Client,
    identity: &Identity,
    peer: Option<&Peer>,
    batch: &[OutboxEntry],
    config: &DeliveryConfig,
) -> (Attempt, Vec<super::Refused>) {
    let Some(entry) = batch.first() else {
        return (Attempt::Delivered, Vec::new());
    };
    let Some(peer) = peer else {
        let error = format!("no peer named `{}`", entry.peer);
        return (Attempt::Dead { error }, Vec::new());
    };
    let (body, content_type) = match batch {
        [one] => (one.body.clone(), "application/cloudevents+json"),
        many => {
            let bodies: Vec<&str> = many.iter().map(|e| e.body.as_str()).collect();
            (
                format!("[{}]", bodies.join(",")),
                crate::workflow::event::BATCH_CONTENT_TYPE,
            )
        }
    };
    let id = webhook_id(batch);
    let webhook = Webhook::sign(identity, id, now_ms() / 1000, body.as_bytes());
    let url = format!("{}/v1/peer/events", peer.url.trim_end_matches('/'));
    let mut request = http.post(&url).header("content-type", content_type);
    for (name, value) in webhook.headers() {
        request = request.header(name, value);
    }
    // The trace travels as an HTTP header too (W3C Trace Context), for the tools in
    // between; a batch carries its first event's, each event keeps its own inside.
    if let Some(traceparent) = serde_json::from_str::<serde_json::Value>(&entry.body)
        .ok()
        .and_then(|event| event.get("traceparent")?.as_str().map(str::to_owned))
    {
        request = request.header("traceparent", traceparent);
    }
    let sent = request.body(body).send().await;
    let error = match sent {
        Ok(response) if response.status().is_success() => {
            let answer: Answer = response.json().await.unwrap_or_default();
            return (Attempt::Delivered, answer.refused);
        }
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            let error = format!(
                "{url} answered {status}: {}",
                body.chars().take(300).collect::<String>()
            );
            if matches!(status, 400 | 401 | 403 | 404 | 413) {
                return (Attempt::Dead { error }, Vec::new());
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
        let error = format!("gave up after {} attempts: {error}", attempts + 1);
        return (Attempt::Dead { error }, Vec::new());
    }
    let doublings = u32::try_from(attempts).unwrap_or(u32::MAX).min(20);
    let backoff = config
        .initial_backoff
        .saturating_mul(1 << doublings)
        .min(config.max_backoff)
        .mul_f64(0.5 + random_fraction() / 2.0);
    let retry = Attempt::Retry {
        error,
        next_unix_ms: now_ms() + i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX / 2),
    };
    (retry, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event_id: &str) -> OutboxEntry {
        OutboxEntry {
            id: 1,
            peer: "acme".into(),
            event_id: event_id.into(),
            status: super::super::OutboxStatus::Pending,
            attempts: 0,
            next_attempt_unix_ms: 0,
            last_error: None,
            created_unix_ms: 0,
            body: String::new(),
        }
    }

    /// Issue 11: the webhook-id changed across retries and could hold a dot.
    #[test]
    fn webhook_ids_are_stable_and_dot_free() {
        assert_eq!(webhook_id(&[entry("evt_1")]), "evt_1");
        let dotted = webhook_id(&[entry("order.1")]);
        assert!(
            !dotted.contains('.') && dotted.starts_with("msg_"),
            "{dotted}"
        );
        let batch = [entry("a"), entry("b")];
        assert_eq!(webhook_id(&batch), webhook_id(&batch));
        assert_ne!(webhook_id(&batch), webhook_id(&[entry("a"), entry("c")]));
        assert!(!webhook_id(&batch).contains('.'));
    }
}
