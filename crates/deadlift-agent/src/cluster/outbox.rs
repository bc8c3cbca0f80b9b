//! The cluster's outbox. Each agent still puts an event in its peers' outboxes in the
//! transaction that stores the event (SQLite, as without a cluster); its deliverer then
//! hands the entries to the stream `DEADLIFT_OUTBOX` ([`Forwarder`]) instead of sending
//! them, and the event is acknowledged to the cluster only once that is done.
//!
//! - Entries of peer `p` are on `deadlift.outbox.<hash of p>`, each with a `Nats-Msg-Id`
//!   of peer, event id and attempts so far: an event routed again by the agent that took
//!   it over is stored once, and a dead entry replayed is stored again.
//! - Every agent pulls every peer's entries from one durable consumer per peer. The
//!   consumer hands an entry to one agent at a time (its lease, for [`LEASE`]); that agent
//!   signs and sends it, and acknowledges it when delivered. A failure is handed back
//!   with the delivery's back-off as the delay, so that any agent may try next; at the
//!   horizon, or when the peer refuses it, the entry is dead: terminated in the stream and
//!   recorded, with its error, in the outbox of the agent that gave up (from where it can
//!   be replayed).
//! - So a peer that is down gets everything once it is back, from whichever agents are
//!   alive then.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::ClusterError;
use crate::Agent;
use crate::clock::now_ms;
use crate::federation::deliver::{self, OutboxForwarder};
use crate::federation::peers::Attempt;
use crate::federation::{OutboxEntry, OutboxStatus};

/// The stream of entries waiting for their peers.
pub const OUTBOX_STREAM: &str = "DEADLIFT_OUTBOX";
const OUTBOX_SUBJECT: &str = "deadlift.outbox";
/// Headers: the entry's first storing time, and its attempts before it was handed over
/// (a replayed dead entry has some).
const CREATED: &str = "Deadlift-Created";
const ATTEMPTS: &str = "Deadlift-Attempts";
/// How long an agent holds an entry it is delivering: longer than one attempt takes.
const LEASE: Duration = Duration::from_secs(60);
/// How often the deliverers follow the peers' list.
const PEER_RESCAN: Duration = Duration::from_secs(1);
/// Most entries, and bytes, one delivery carries (as the local deliverer's batches).
const MAX_BATCH: usize = 100;
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A peer's token in subjects and consumer names: any peer name fits.
fn token(peer: &str) -> String {
    hex::encode(&Sha256::digest(peer.as_bytes())[..16])
}

/// Hands this agent's due outbox entries to the cluster.
#[derive(Debug)]
pub(super) struct Forwarder {
    jetstream: jetstream::Context,
}

#[async_trait::async_trait]
impl OutboxForwarder for Forwarder {
    async fn forward(&self, entries: &[OutboxEntry]) -> Result<(), String> {
        let mut pending = Vec::with_capacity(entries.len());
        for entry in entries {
            let id = hex::encode(
                Sha256::new()
                    .chain_update(entry.peer.as_bytes())
                    .chain_update([0])
                    .chain_update(entry.event_id.as_bytes())
                    .chain_update([0])
                    .chain_update(entry.attempts.to_be_bytes())
                    .finalize(),
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            headers.insert(CREATED, entry.created_unix_ms.to_string().as_str());
            headers.insert(ATTEMPTS, entry.attempts.to_string().as_str());
            let subject = format!("{OUTBOX_SUBJECT}.{}", token(&entry.peer));
            let ack = self
                .jetstream
                .publish_with_headers(subject, headers, entry.body.clone().into())
                .await
                .map_err(|e| e.to_string())?;
            pending.push(ack);
        }
        for ack in pending {
            ack.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Makes the stream and starts delivering every peer's entries; the agent's own
/// deliverer forwards to the returned [`Forwarder`].
pub(super) async fn start(
    jetstream: &jetstream::Context,
    replicas: usize,
    dedupe_window: Duration,
    agent: Weak<Agent>,
) -> Result<(Forwarder, JoinHandle<()>), ClusterError> {
    let outbox = jetstream
        .get_or_create_stream(stream::Config {
            name: OUTBOX_STREAM.into(),
            subjects: vec![format!("{OUTBOX_SUBJECT}.*")],
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            duplicate_window: dedupe_window,
            // An entry acknowledged as delivered leaves the stream; the delivering
            // agent's outbox keeps the record.
            retention: stream::RetentionPolicy::WorkQueue,
            ..stream::Config::default()
        })
        .await
        .map_err(|e| ClusterError::Setup(e.to_string()))?;
    let following = tokio::spawn(follow_peers(outbox, agent));
    Ok((
        Forwarder {
            jetstream: jetstream.clone(),
        },
        following,
    ))
}

/// Keeps one delivering task per peer this agent knows (peers are shared settings).
async fn follow_peers(outbox: stream::Stream, agent: Weak<Agent>) {
    let mut delivering: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
    loop {
        let Some(peers) = agent
            .upgrade()
            .map(|agent| agent.federation().peers().into_iter().map(|p| p.name))
        else {
            return;
        };
        let peers: Vec<String> = peers.collect();
        delivering.retain(|peer, task| {
            let keep = peers.contains(peer) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for peer in peers {
            if let std::collections::btree_map::Entry::Vacant(vacant) = delivering.entry(peer) {
                let peer = vacant.key().clone();
                vacant.insert(tokio::spawn(deliver_to(
                    outbox.clone(),
                    peer,
                    agent.clone(),
                )));
            }
        }
        tokio::time::sleep(PEER_RESCAN).await;
    }
}

/// Pulls one peer's entries in batches, delivers each batch and settles every entry.
async fn deliver_to(outbox: stream::Stream, peer: String, agent: Weak<Agent>) {
    let durable = format!("outbox-{}", token(&peer));
    let consumer: consumer::PullConsumer = loop {
        let made = outbox
            .get_or_create_consumer(
                &durable,
                consumer::pull::Config {
                    durable_name: Some(durable.clone()),
                    filter_subject: format!("{OUTBOX_SUBJECT}.{}", token(&peer)),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: LEASE,
                    ..consumer::pull::Config::default()
                },
            )
            .await;
        match made {
            Ok(consumer) => break consumer,
            Err(error) => {
                tracing::warn!(%peer, "cannot follow the peer's outbox in the cluster: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let Some(http) = deliver::http_client() else {
        return;
    };
    loop {
        let fetched = consumer
            .batch()
            .max_messages(MAX_BATCH)
            .max_bytes(MAX_BATCH_BYTES)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut messages = match fetched {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%peer, "cannot pull the peer's outbox: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut batch = Vec::new();
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => batch.push(message),
                Err(error) => {
                    tracing::debug!(%peer, "pulling the peer's outbox: {error}");
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let Some(agent) = agent.upgrade() else {
            return;
        };
        let entries: Vec<OutboxEntry> = batch.iter().map(|m| entry_of(&peer, m)).collect();
        let federation = agent.federation();
        let known = federation.peer(&peer);
        let (outcome, refused) = deliver::attempt(
            &http,
            federation.identity(),
            known.as_ref(),
            &entries,
            federation.delivery_config(),
        )
        .await;
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(entries.len());
        for (message, entry) in batch.iter().zip(entries) {
            let attempt = match refused.iter().find(|r| r.id == entry.event_id) {
                Some(refusal) => Attempt::Dead {
                    error: format!("refused by the peer: {}", refusal.message),
                },
                None => outcome.clone(),
            };
            let settled = match &attempt {
                Attempt::Delivered => message.double_ack().await,
                Attempt::Retry { next_unix_ms, .. } => {
                    let delay = u64::try_from(next_unix_ms - now).unwrap_or(0);
                    message
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(delay))))
                        .await
                }
                Attempt::Dead { error } => {
                    tracing::warn!(%peer, event = %entry.event_id, error = %error.escape_debug(), "delivery dead-lettered");
                    message.ack_with(jetstream::AckKind::Term).await
                }
            };
            if let Err(error) = settled {
                // The lease runs out and another agent tries: the peer may get the event
                // twice, which its `webhook-id` lets it recognise.
                tracing::warn!(%peer, event = %entry.event_id, "cannot settle a cluster delivery: {error}");
            }
            outcomes.push((entry, attempt));
        }
        deliver::record_cluster(federation.journal(), outcomes).await;
    }
}

/// The outbox entry a stream message carries (attempts: every agent's so far).
fn entry_of(peer: &str, message: &jetstream::Message) -> OutboxEntry {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .and_then(|value| value.as_str().parse::<i64>().ok())
    };
    let body = String::from_utf8_lossy(&message.payload).into_owned();
    let event_id = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|event| event.get("id")?.as_str().map(str::to_owned))
        .unwrap_or_default();
    let delivered = message.info().map_or(1, |info| info.delivered);
    OutboxEntry {
        id: 0,
        peer: peer.to_owned(),
        event_id,
        status: OutboxStatus::Forwarded,
        attempts: header(ATTEMPTS).unwrap_or(0) + delivered.saturating_sub(1),
        next_attempt_unix_ms: 0,
        last_error: None,
        created_unix_ms: header(CREATED).unwrap_or_else(now_ms),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_token_is_a_subject_token_for_any_name() {
        for name in ["acme", "a.b", "x y", "*", ">"] {
            let token = token(name);
            assert_eq!(token.len(), 32);
            assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
        }
        assert_ne!(token("a"), token("b"));
    }
}
