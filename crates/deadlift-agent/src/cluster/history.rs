//! History every agent of a cluster answers for: each agent publishes the runs it
//! finishes to the stream `DEADLIFT_HISTORY` (subject `deadlift.history.<tenant>`), and
//! each follows that stream with a durable consumer of its own, storing the other
//! agents' runs, with their steps, in its own journal (`Journal::import_run`). So
//! `GET /v1/runs` and `GET /v1/runs/{id}` on any agent show the cluster's runs, a moment
//! after they finish. An agent that was away catches up from where it left off.
//!
//! Imported runs are records: this agent never resumes, exports or shares them again
//! (watchers of its live list see them, marked imported). A failed one is a dead letter
//! here too, but retries, replays and cancels are the agent's that ran it
//! (`run_elsewhere` here): the import records who that was.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use super::ClusterError;
use crate::workflow::{Journal, Run, Runtime};

/// The stream of finished runs.
pub const HISTORY_STREAM: &str = "DEADLIFT_HISTORY";
const HISTORY_SUBJECT: &str = "deadlift.history";
/// The header naming the agent that ran a run (its member id, `cluster-member.id`).
const RAN_BY: &str = "Deadlift-Agent";

/// Shares this agent's finished runs with the cluster's history.
#[derive(Debug, Clone)]
pub(crate) struct Sharer {
    jetstream: jetstream::Context,
    journal: Journal,
    me: String,
}

impl Sharer {
    /// Publishes one finished run (again: the stream drops a repeat), trying again for
    /// up to [`SHARE_FOR`] while the cluster cannot take it (a NATS node died and the
    /// stream elects a new leader); whether it was taken.
    pub(crate) async fn share(&self, tenant: &str, run_id: &str) -> bool {
        share_patiently(&self.jetstream, &self.journal, tenant, run_id, &self.me).await
    }
}

/// Starts publishing this agent's finished runs and importing the others'.
pub(crate) async fn start(
    jetstream: &jetstream::Context,
    replicas: usize,
    kept: Duration,
    member: &str,
    runtime: &Runtime,
) -> Result<(Sharer, Vec<JoinHandle<()>>), ClusterError> {
    let setup = |e: &dyn std::fmt::Display| ClusterError::Setup(e.to_string());
    let history = jetstream
        .get_or_create_stream(stream::Config {
            name: HISTORY_STREAM.into(),
            subjects: vec![format!("{HISTORY_SUBJECT}.*")],
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            max_age: kept,
            duplicate_window: Duration::from_secs(120).min(kept),
            ..stream::Config::default()
        })
        .await
        .map_err(|e| setup(&e))?;
    let me = member.to_owned();
    let durable = format!("history-{me}");
    let imports: consumer::PullConsumer = history
        .get_or_create_consumer(
            &durable,
            consumer::pull::Config {
                durable_name: Some(durable.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                ack_wait: Duration::from_secs(30),
                ..consumer::pull::Config::default()
            },
        )
        .await
        .map_err(|e| setup(&e))?;
    let journal = runtime.journal().clone();
    let publishing = tokio::spawn(publish(
        jetstream.clone(),
        journal.clone(),
        runtime.subscribe().0,
        me.clone(),
    ));
    let importing = tokio::spawn(import(imports, journal.clone(), me.clone()));
    let sharer = Sharer {
        jetstream: jetstream.clone(),
        journal,
        me,
    };
    Ok((sharer, vec![publishing, importing]))
}

/// Runs shared with the cluster at once.
const SHARING: usize = 64;
/// How long sharing a run is tried for.
const SHARE_FOR: Duration = Duration::from_secs(30);

async fn share_patiently(
    jetstream: &jetstream::Context,
    journal: &Journal,
    tenant: &str,
    run_id: &str,
    me: &str,
) -> bool {
    let deadline = tokio::time::Instant::now() + SHARE_FOR;
    let mut wait = Duration::from_millis(50);
    loop {
        if share(jetstream, journal, tenant, run_id, me).await {
            return true;
        }
        if tokio::time::Instant::now() + wait > deadline {
            return false;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Publishes each run this agent finishes, read whole from its journal, a few at once.
/// Should the updates outrun it, it shares again every run that finished since it last
/// kept up (the stream and the importers drop what they have).
async fn publish(
    jetstream: jetstream::Context,
    journal: Journal,
    mut updates: tokio::sync::broadcast::Receiver<crate::workflow::RunUpdate>,
    me: String,
) {
    let sharing = std::sync::Arc::new(tokio::sync::Semaphore::new(SHARING));
    let mut kept_up = crate::clock::now_ms();
    loop {
        let finished: Vec<(String, String)> = match updates.recv().await {
            Ok(update) if update.run.status.is_finished() && !update.imported => {
                kept_up = crate::clock::now_ms();
                vec![(update.tenant, update.run.id)]
            }
            Ok(_) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::info!(
                    missed,
                    "runs finished faster than they were shared; sharing those since"
                );
                let since = kept_up - 1000;
                kept_up = crate::clock::now_ms();
                journal.finished_since(since).await.unwrap_or_default()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        for (tenant, run_id) in finished {
            let Ok(permit) = sharing.clone().acquire_owned().await else {
                return;
            };
            let (jetstream, journal, me) = (jetstream.clone(), journal.clone(), me.clone());
            tokio::spawn(async move {
                share_patiently(&jetstream, &journal, &tenant, &run_id, &me).await;
                drop(permit);
            });
        }
    }
}

/// Publishes one finished run to the history stream; false when the stream did not
/// take it.
async fn share(
    jetstream: &jetstream::Context,
    journal: &Journal,
    tenant: &str,
    run_id: &str,
    me: &str,
) -> bool {
    let run = match journal.run(tenant, run_id).await {
        Ok(Some(run)) => run,
        Ok(None) => return true,
        Err(error) => {
            tracing::warn!(run = %run_id, "cannot read a finished run to share it: {error}");
            return false;
        }
    };
    let Ok(body) = serde_json::to_vec(&run) else {
        return true;
    };
    let mut headers = async_nats::HeaderMap::new();
    let finished = run.summary.finished_unix_ms.unwrap_or_default();
    headers.insert(
        "Nats-Msg-Id",
        format!("{}:{finished}", run.summary.id).as_str(),
    );
    headers.insert(RAN_BY, me);
    let subject = format!("{HISTORY_SUBJECT}.{tenant}");
    let stored = match jetstream
        .publish_with_headers(subject, headers, body.into())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match stored {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(run = %run.summary.id, "the cluster's history did not take a run: {error}");
            false
        }
    }
}

/// Stores the other agents' finished runs here, acknowledging each once stored.
async fn import(consumer: consumer::PullConsumer, journal: Journal, me: String) {
    loop {
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!("cannot follow the cluster's history: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let Ok(message) = message else {
                break;
            };
            let ran_by = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(RAN_BY))
                .map(|ran_by| ran_by.as_str().to_owned())
                .unwrap_or_default();
            let mine = ran_by == me;
            let tenant = message
                .subject
                .strip_prefix(HISTORY_SUBJECT)
                .and_then(|rest| rest.strip_prefix('.'))
                .filter(|tenant| deadlift_engine::names::tenant_name(tenant).is_ok())
                .map(str::to_owned);
            let run = serde_json::from_slice::<Run>(&message.payload).ok();
            let (Some(tenant), Some(run), false) = (tenant, run, mine) else {
                let _ = message.ack().await;
                continue;
            };
            match journal.import_run(&tenant, run, &ran_by).await {
                Ok(_) => {
                    let _ = message.ack().await;
                }
                // The run's tenant may not be here yet: later.
                Err(error) => {
                    tracing::debug!(%tenant, "a run from the cluster's history waits: {error}");
                    let _ = message
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
