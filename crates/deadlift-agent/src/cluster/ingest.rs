//! Ingest: every agent pulls events from the shared durable consumer and journals each
//! under its lease (`runs.rs`): once it has the settings the posting agent had, it
//! routes the event and runs its runs here, and acknowledges the event only once they
//! have ended and are in the history and the event's outbox entries are in the cluster,
//! telling the cluster meanwhile that it is still at work. An agent that leaves hands
//! back the events it still holds.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::{CATCH_UP, EVENTS_SUBJECT, FROM_PEER, INGESTING, SETTINGS_REVISION};
use super::{history, runs, shared};
use crate::workflow::{CloudEvent, Journal};

/// What ingesting an event needs.
#[derive(Debug, Clone)]
pub(super) struct Ingest {
    pub(super) agent: std::sync::Weak<crate::Agent>,
    pub(super) journal: Journal,
    pub(super) revisions: Arc<shared::Revisions>,
    pub(super) sharer: history::Sharer,
    pub(super) steps: runs::StepJournal,
    pub(super) ack_wait: Duration,
    /// True once the agent leaves the cluster.
    pub(super) left: tokio::sync::watch::Receiver<bool>,
}

/// Pulls events from the shared consumer and journals each here (`ingest`). Reconnects
/// after a failure.
pub(super) async fn pull_events(consumer: consumer::PullConsumer, ingest: Ingest) {
    let ingesting = Arc::new(Semaphore::new(INGESTING));
    loop {
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!("cannot pull events from the cluster: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!("pulling events from the cluster: {error}");
                    break;
                }
            };
            let Ok(permit) = ingesting.clone().acquire_owned().await else {
                return;
            };
            let ingest = ingest.clone();
            tokio::spawn(async move {
                ingest.one(message).await;
                drop(permit);
            });
        }
    }
}

impl Ingest {
    /// Journals one pulled event under its lease once this agent has the settings it
    /// needs, and acknowledges it once its runs have ended and are in the cluster's
    /// history. An event that can never be journaled (not an event, an unknown subject)
    /// is terminated, so that it is not redelivered for ever; one the journal could not
    /// take now goes back to the cluster.
    async fn one(&self, message: jetstream::Message) {
        let tenant = message
            .subject
            .strip_prefix(EVENTS_SUBJECT)
            .and_then(|rest| rest.strip_prefix('.'))
            .filter(|tenant| deadlift_engine::names::tenant_name(tenant).is_ok())
            .map(str::to_owned);
        let event = serde_json::from_slice::<CloudEvent>(&message.payload)
            .ok()
            .filter(|event| event.validate().is_ok());
        let info = message.info().ok().map(|info| {
            (
                info.stream_sequence,
                (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
                info.delivered,
            )
        });
        let (Some(tenant), Some(event), Some((sequence, published, delivered))) =
            (tenant, event, info)
        else {
            tracing::warn!(subject = %message.subject, "not a Deadlift event; dropped from the cluster's stream");
            let _ = message.ack_with(jetstream::AckKind::Term).await;
            return;
        };
        let back_later = || message.ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))));
        // Not before this agent has the settings (workflows, modules) the event's agent
        // had.
        let needed = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(SETTINGS_REVISION))
            .and_then(|value| value.as_str().parse::<u64>().ok())
            .unwrap_or(0);
        let started = tokio::time::Instant::now();
        while self.revisions.applied() < needed {
            if started.elapsed() > CATCH_UP {
                tracing::warn!(%tenant, needed, applied = self.revisions.applied(), "behind the cluster's settings; the event goes back");
                let _ = back_later().await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Handed out before: its agent died or stalled, maybe mid-run. The lease brings
        // what that agent journaled, and the runs go on after it.
        let lease = match self
            .steps
            .lease(&tenant, sequence, published, delivered > 1)
            .await
        {
            Ok(lease) => lease,
            Err(error) => {
                tracing::warn!(%tenant, "cannot read the cluster's step journal ({error}); the event goes back");
                let _ = back_later().await;
                return;
            }
        };
        let event_id = event.id.clone();
        let from_peer = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(FROM_PEER))
            .map(|peer| peer.as_str().to_owned())
            .filter(|peer| crate::workflow::spec::validate_name(peer).is_ok());
        let runs = match self
            .journal
            .publish_leased(&tenant, event, from_peer, lease.clone())
            .await
        {
            Ok(ingested) => ingested.runs,
            Err(error) => {
                tracing::warn!(%tenant, "cannot journal an event from the cluster ({error}); it will be redelivered");
                let _ = back_later().await;
                return;
            }
        };
        // The event stays this agent's until its runs have ended and are in the
        // cluster's history: if the agent dies first, the cluster hands the event to
        // another agent, which takes the runs over.
        let this = self.clone();
        tokio::spawn(async move {
            let progress_every = this.ack_wait / 3;
            let held = hold_until_finished(
                &this.journal,
                &tenant,
                &runs,
                &message,
                &lease,
                progress_every,
                this.left.clone(),
            )
            .await;
            match held {
                Held::Finished => {}
                // A run stopped here: the event is another agent's now, or will be.
                Held::Lost => return,
                Held::Leaving => {
                    // The agent stops: the event goes back now, not when its lease ends,
                    // and the next holder takes its runs over.
                    let _ = message.ack_with(jetstream::AckKind::Nak(None)).await;
                    return;
                }
            }
            // Its deliveries to peers are in the cluster's outbox before it goes.
            this.hold_until_forwarded(&tenant, &event_id, &message)
                .await;
            for run in &runs {
                // Still in hand while the history takes it.
                let sharing = this.sharer.share(&tenant, run);
                tokio::pin!(sharing);
                let mut progress = tokio::time::interval(progress_every);
                let shared = loop {
                    tokio::select! {
                        shared = &mut sharing => break shared,
                        _ = progress.tick() => {
                            let _ = message.ack_with(jetstream::AckKind::Progress).await;
                        }
                    }
                };
                if !shared {
                    // Not in the history: another agent would not know the run ended. The
                    // event goes back, and comes here again or is taken over elsewhere.
                    tracing::warn!(%tenant, %run, "a run was not shared with the cluster; its event goes back");
                    let _ = message
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    return;
                }
            }
            if let Err(error) = message.double_ack().await {
                tracing::warn!(
                    "an event whose runs ended here was not acknowledged ({error}); another agent may take it over"
                );
            }
        });
    }

    /// Waits until this agent has handed the event's outbox entries to the cluster.
    async fn hold_until_forwarded(
        &self,
        tenant: &str,
        event_id: &str,
        message: &jetstream::Message,
    ) {
        let mut last_progress = tokio::time::Instant::now();
        loop {
            let Some(agent) = self.agent.upgrade() else {
                return;
            };
            match agent.federation().unforwarded(tenant, event_id).await {
                Ok(true) => {}
                _ => return,
            }
            drop(agent);
            if last_progress.elapsed() > self.ack_wait / 3 {
                let _ = message.ack_with(jetstream::AckKind::Progress).await;
                last_progress = tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How holding an event's runs ended.
enum Held {
    Finished,
    /// A run stopped here without ending (the lease was lost).
    Lost,
    /// The agent is leaving the cluster.
    Leaving,
}

/// Waits until every one of `runs` has ended, telling the cluster every few seconds that
/// the event is still in hand (so that its ack wait does not run out).
async fn hold_until_finished(
    journal: &Journal,
    tenant: &str,
    runs: &[String],
    message: &jetstream::Message,
    lease: &runs::Lease,
    progress_every: Duration,
    mut left: tokio::sync::watch::Receiver<bool>,
) -> Held {
    let mut wait = Duration::from_millis(10);
    let mut last_progress = tokio::time::Instant::now();
    for run in runs {
        loop {
            match journal.run(tenant, run).await {
                Ok(Some(run)) if !run.summary.status.is_finished() => {}
                // Ended, gone (pruned), or unreadable: nothing more to wait for.
                _ => break,
            }
            if lease.is_lost() {
                return Held::Lost;
            }
            if *left.borrow() {
                return Held::Leaving;
            }
            if last_progress.elapsed() > progress_every {
                let _ = message.ack_with(jetstream::AckKind::Progress).await;
                last_progress = tokio::time::Instant::now();
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = left.changed() => {}
            }
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }
    Held::Finished
}
