//! Runs under the cluster's lease. The shared consumer hands each event to one agent;
//! while that agent keeps telling the cluster it is at work, the event and its runs are
//! its (the journal and runner see this as a [`RunLease`], `workflow/lease.rs`).
//!
//! - **The step journal** is the stream `DEADLIFT_STEPS`: each step of a leased run is a
//!   message on `deadlift.steps.<event key>.<run id>`, written before the agent commits
//!   the step or starts the next one. Each write names the subject's last sequence the
//!   agent knows (`Nats-Expected-Last-Subject-Sequence`): of two agents that both
//!   believe they hold a run (one stalled past its lease), only one journals the next
//!   step, and the other stops the run.
//! - **Taking over**: an event handed out again (its agent died or stalled) brings the
//!   steps journaled under its key, and the new holder resumes each run after them, so a
//!   journaled step never runs again. Run ids come from the event's place in the events
//!   stream and the workflow's name, so every holder names the same runs.
//! - **Emitted events** of a leased run's step go to the events stream before the step
//!   is journaled, each keyed by run, step and index, so a step run again by the next
//!   holder (it was not journaled) does not emit twice within the stream's dedupe window.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ClusterError, EVENTS_SUBJECT, SETTINGS_REVISION, shared::Revisions};
use crate::workflow::{CloudEvent, Finish, LeaseLost, PriorSteps, RunLease, StepRecord};

/// The stream of leased runs' steps.
pub const STEPS_STREAM: &str = "DEADLIFT_STEPS";
const STEPS_SUBJECT: &str = "deadlift.steps";
/// How long a step write is tried for while the cluster cannot take it (a NATS node
/// died and the stream elects a new leader) before the run stops here.
const WRITE_FOR: Duration = Duration::from_secs(10);
/// Most step messages read when an event is taken over.
const MAX_PRIOR_STEPS: usize = 10_000;

/// One journaled step, as the stream holds it.
#[derive(Debug, Serialize, Deserialize)]
struct JournaledStep {
    position: usize,
    record: StepRecord,
    /// Set when this step ended the run.
    finish: Option<Finish>,
}

/// The step journal of this agent's cluster.
#[derive(Debug, Clone)]
pub(super) struct StepJournal {
    jetstream: jetstream::Context,
    steps: stream::Stream,
    revisions: Arc<Revisions>,
    /// When the events stream was made: its sequences start again if it is made again.
    events_created: i64,
    /// This process, in the ids of its writes (a write tried again is stored once).
    me: String,
}

impl StepJournal {
    pub(super) async fn start(
        jetstream: &jetstream::Context,
        replicas: usize,
        kept: Duration,
        events_created: i64,
        revisions: Arc<Revisions>,
    ) -> Result<Self, ClusterError> {
        let steps = jetstream
            .get_or_create_stream(stream::Config {
                name: STEPS_STREAM.into(),
                subjects: vec![format!("{STEPS_SUBJECT}.>")],
                storage: stream::StorageType::File,
                num_replicas: replicas.max(1),
                max_age: kept,
                duplicate_window: Duration::from_secs(120).min(kept),
                ..stream::Config::default()
            })
            .await
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        Ok(Self {
            jetstream: jetstream.clone(),
            steps,
            revisions,
            events_created,
            me: crate::workflow::event::new_id(""),
        })
    }

    /// The lease on the event at `stream_sequence` of the events stream (stored at
    /// `published_unix_ms`), with the steps journaled for its runs when it was handed
    /// out before (`taken_over`).
    pub(super) async fn lease(
        &self,
        tenant: &str,
        stream_sequence: u64,
        published_unix_ms: i64,
        taken_over: bool,
    ) -> Result<Arc<Lease>, String> {
        let key = hex::encode(
            &Sha256::new()
                .chain_update(self.events_created.to_be_bytes())
                .chain_update(stream_sequence.to_be_bytes())
                .finalize()[..16],
        );
        let (prior, last) = if taken_over {
            self.read(&key).await?
        } else {
            Default::default()
        };
        Ok(Arc::new(Lease {
            journal: self.clone(),
            tenant: tenant.to_owned(),
            stamp: format!(
                "{:012x}",
                published_unix_ms.max(0) as u64 & 0xffff_ffff_ffff
            ),
            key,
            prior,
            last: Mutex::new(last),
            lost: AtomicBool::new(false),
        }))
    }

    /// Everything journaled under an event's key: each run's newest record per step,
    /// its end, and its subject's last sequence.
    async fn read(
        &self,
        key: &str,
    ) -> Result<(HashMap<String, PriorSteps>, HashMap<String, u64>), String> {
        let messages = super::read_now(
            &self.steps,
            format!("{STEPS_SUBJECT}.{key}.*"),
            consumer::DeliverPolicy::All,
            false,
            MAX_PRIOR_STEPS,
        )
        .await?;
        let mut steps: HashMap<String, (BTreeMap<usize, StepRecord>, Option<Finish>)> =
            HashMap::new();
        let mut last = HashMap::new();
        for message in messages {
            let Some(run_id) = message.subject.rsplit('.').next().map(str::to_owned) else {
                continue;
            };
            if let Ok(info) = message.info() {
                last.insert(run_id.clone(), info.stream_sequence);
            }
            match serde_json::from_slice::<JournaledStep>(&message.payload) {
                Ok(step) => {
                    let run = steps.entry(run_id).or_default();
                    run.0.insert(step.position, step.record);
                    if step.finish.is_some() {
                        run.1 = step.finish;
                    }
                }
                Err(error) => {
                    tracing::warn!(subject = %message.subject, "an unreadable step in the cluster's journal: {error}")
                }
            }
        }
        let prior = steps
            .into_iter()
            .map(|(run, (steps, finish))| {
                let steps = steps.into_iter().collect();
                (run, PriorSteps { steps, finish })
            })
            .collect();
        Ok((prior, last))
    }

    /// Publishes `body` with `headers` to `subject`, trying again for [`WRITE_FOR`] while
    /// the cluster cannot take it; a refused expectation is not tried again.
    async fn write(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        body: bytes::Bytes,
    ) -> Result<jetstream::publish::PublishAck, LeaseLost> {
        let deadline = tokio::time::Instant::now() + WRITE_FOR;
        let mut wait = Duration::from_millis(50);
        loop {
            let attempt = async {
                self.jetstream
                    .publish_with_headers(subject.clone(), headers.clone(), body.clone())
                    .await?
                    .await
            };
            let error = match attempt.await {
                Ok(ack) => return Ok(ack),
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(LeaseLost::TakenOver);
                }
                Err(error) => error,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(LeaseLost::Unreachable(error.to_string()));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }
}

/// This agent's lease on one event's runs.
#[derive(Debug)]
pub(super) struct Lease {
    journal: StepJournal,
    tenant: String,
    /// The event's key in the step journal.
    key: String,
    /// The event's storing time, in the first part of its runs' ids (as other run ids).
    stamp: String,
    prior: HashMap<String, PriorSteps>,
    /// Each run's last sequence in the step journal, as this agent knows it.
    last: Mutex<HashMap<String, u64>>,
    lost: AtomicBool,
}

impl Lease {
    /// Whether a run of this event stopped here without ending (another agent took it
    /// over, or the journal was unreachable): the event is no longer this agent's.
    pub(super) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

#[async_trait::async_trait]
impl RunLease for Lease {
    fn run_id(&self, workflow: &str) -> String {
        let digest = Sha256::new()
            .chain_update(self.key.as_bytes())
            .chain_update([0])
            .chain_update(workflow.as_bytes())
            .finalize();
        format!("run_{}{}", self.stamp, hex::encode(&digest[..10]))
    }

    fn prior(&self, run_id: &str) -> PriorSteps {
        self.prior.get(run_id).cloned().unwrap_or_default()
    }

    async fn journal_step(
        &self,
        run_id: &str,
        position: usize,
        record: &StepRecord,
        finish: Option<&Finish>,
        emitted: &[CloudEvent],
    ) -> Result<(), LeaseLost> {
        let journal = &self.journal;
        // The events first: once the step is journaled, nobody runs it again to emit them.
        let subject = format!("{EVENTS_SUBJECT}.{}", self.tenant);
        for (index, event) in emitted.iter().enumerate() {
            let id = hex::encode(
                Sha256::new()
                    .chain_update(run_id.as_bytes())
                    .chain_update(position.to_be_bytes())
                    .chain_update(index.to_be_bytes())
                    .finalize(),
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let applied = journal.revisions.applied().to_string();
            headers.insert(SETTINGS_REVISION, applied.as_str());
            let body =
                serde_json::to_vec(event).map_err(|e| LeaseLost::Unreachable(e.to_string()))?;
            journal.write(subject.clone(), headers, body.into()).await?;
        }
        let expected = self.last.lock().get(run_id).copied().unwrap_or(0);
        let step = JournaledStep {
            position,
            record: record.clone(),
            finish: finish.cloned(),
        };
        let body = serde_json::to_vec(&step).map_err(|e| LeaseLost::Unreachable(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        let write_id = format!("{}.{run_id}.{expected}", journal.me);
        headers.insert("Nats-Msg-Id", write_id.as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        let subject = format!("{STEPS_SUBJECT}.{}.{run_id}", self.key);
        let ack = journal.write(subject, headers, body.into()).await?;
        self.last.lock().insert(run_id.to_owned(), ack.sequence);
        Ok(())
    }

    fn lost(&self, _run_id: &str, _why: &LeaseLost) {
        self.lost.store(true, Ordering::Release);
    }
}
