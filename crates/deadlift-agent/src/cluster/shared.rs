//! Settings every agent of a cluster shares: tenants, tenant tokens (their hashes),
//! modules (metadata in the KV bucket, bytes in the object store `deadlift-modules`),
//! module manifests, workflows, releases and hook bindings. Each lives under one key of
//! the KV bucket `deadlift-settings` (`tenants.<t>`, `tokens.<id>`, `modules.<t>.<hex>`,
//! `manifests.<t>.<hex>`, `workflows.<t>.<name>`, `releases.<t>.<name>`,
//! `bindings.<t>.<hook>`); a deleted one is a deleted key.
//!
//! Each agent keeps its own copy in its SQLite database, as without a cluster, and the
//! bucket keeps the copies together:
//! - a change made through this agent's API is named to [`Shared::changed`]; a publisher
//!   task reads the local value and puts it (or deletes the key) when the bucket holds
//!   something else;
//! - a watcher task follows every key of the bucket (its current values first) and
//!   applies each value that differs from the local one, through the same agent methods
//!   the API uses (so a module is validated and compiled here too). What cannot be
//!   applied yet (a workflow whose module has not arrived) is tried again every second.
//!
//! Applying a remote value never names a change, so nothing echoes back and forth; an
//! agent's own puts come back to it as values equal to its own, which it skips. Admin
//! tokens stay each agent's own (each operator configures its agent's).
//!
//! **Read your writes.** An API change answers only once the bucket holds it, and each
//! agent knows the bucket revision through which it has applied everything
//! ([`Revisions`]). Events carry the newest revision their agent knew when it stored
//! them, and the agent that pulls an event journals it only once it has applied as far:
//! a workflow applied on one agent runs for an event posted to it right after, wherever
//! the event is journaled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::ClusterError;
use super::setting::{Setting, apply, local};
use crate::Agent;

/// The KV bucket of shared settings.
pub const SETTINGS_BUCKET: &str = "deadlift-settings";
/// The object store of module bytes, by module id (hex).
pub const MODULES_BUCKET: &str = "deadlift-modules";
/// How often settings that could not be applied are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long a setting that cannot be applied here holds back the events that follow it.
const HOLD_BACK: Duration = Duration::from_secs(10);
/// A setting not applied yet: its revision, its value, since when it waits.
type Waiting = (u64, Option<Value>, tokio::time::Instant);
/// How long an API change waits for the bucket to hold it.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// Bucket revisions this agent knows of.
#[derive(Debug, Default)]
pub(crate) struct Revisions {
    /// Every entry through this revision is applied here (or waits for nothing).
    applied: AtomicU64,
    /// The newest revision this agent put.
    put: AtomicU64,
    /// The newest revision this agent has seen, applied or not.
    seen: AtomicU64,
}

impl Revisions {
    /// What an event stored now must wait for where it is journaled.
    pub(crate) fn known(&self) -> u64 {
        self.applied
            .load(Ordering::Acquire)
            .max(self.put.load(Ordering::Acquire))
            .max(self.seen.load(Ordering::Acquire))
    }

    pub(crate) fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }
}

/// A change to publish, and who waits for it to be in the bucket.
type Change = (Setting, Option<oneshot::Sender<()>>);

/// The shared settings of this agent's cluster.
#[derive(Debug)]
pub(crate) struct Shared {
    changes: mpsc::UnboundedSender<Change>,
    pub(crate) revisions: Arc<Revisions>,
    /// The bucket's stream, asked for its newest revision.
    stream: jetstream::stream::Stream<()>,
}

impl Shared {
    /// Opens (or makes) the bucket and the object store, names everything this agent
    /// holds to the publisher (what the cluster lacks is put), and starts following the
    /// bucket. Returns the tasks it started.
    pub(crate) async fn start(
        jetstream: &jetstream::Context,
        replicas: usize,
        agent: Weak<Agent>,
        seed: Vec<Setting>,
    ) -> Result<(Self, Vec<tokio::task::JoinHandle<()>>), ClusterError> {
        let setup = |e: &dyn std::fmt::Display| ClusterError::Setup(e.to_string());
        let settings = jetstream
            .create_key_value(kv::Config {
                bucket: SETTINGS_BUCKET.into(),
                history: 1,
                num_replicas: replicas.max(1),
                storage: jetstream::stream::StorageType::File,
                ..kv::Config::default()
            })
            .await
            .map_err(|e| setup(&e))?;
        let modules = jetstream
            .create_object_store(object_store::Config {
                bucket: MODULES_BUCKET.into(),
                num_replicas: replicas.max(1),
                storage: jetstream::stream::StorageType::File,
                ..object_store::Config::default()
            })
            .await
            .map_err(|e| setup(&e))?;
        let (changes, queued) = mpsc::unbounded_channel();
        for setting in seed {
            let _ = changes.send((setting, None));
        }
        let revisions = Arc::new(Revisions::default());
        let publishing = tokio::spawn(publish(
            queued,
            settings.clone(),
            modules.clone(),
            agent.clone(),
            revisions.clone(),
        ));
        let following = tokio::spawn(follow(settings, modules, agent, revisions.clone()));
        let stream = jetstream
            .get_stream_no_info(format!("KV_{SETTINGS_BUCKET}"))
            .await
            .map_err(|e| setup(&e))?;
        Ok((
            Self {
                changes,
                revisions,
                stream,
            },
            vec![publishing, following],
        ))
    }

    /// The bucket's newest revision now (what this agent knows, if the cluster cannot
    /// say): whatever a client changed before, through any agent, is at or before it.
    pub(crate) async fn newest(&self) -> u64 {
        let known = self.revisions.known();
        match self.stream.get_info().await {
            Ok(info) => info.state.last_sequence.max(known),
            Err(error) => {
                tracing::debug!("cannot ask the settings' newest revision: {error}");
                known
            }
        }
    }

    /// A setting changed here: the cluster gets its new value (or its deletion). Answers
    /// once the bucket holds it, or after [`PUBLISH_WAIT`] (the publisher keeps trying).
    pub(crate) async fn changed(&self, setting: Setting) {
        let (done, published) = oneshot::channel();
        if self.changes.send((setting, Some(done))).is_ok() {
            let _ = tokio::time::timeout(PUBLISH_WAIT, published).await;
        }
    }
}

/// Puts each named setting's local value into the bucket (its module's bytes into the
/// object store first), or deletes its key, when the bucket holds something else.
async fn publish(
    mut queued: mpsc::UnboundedReceiver<Change>,
    settings: kv::Store,
    modules: object_store::ObjectStore,
    agent: Weak<Agent>,
    revisions: Arc<Revisions>,
) {
    while let Some((setting, done)) = queued.recv().await {
        let Some(agent) = agent.upgrade() else {
            return;
        };
        let mut delay = Duration::from_millis(100);
        loop {
            match publish_one(&agent, &settings, &modules, &setting).await {
                Ok(Some(revision)) => {
                    revisions.put.fetch_max(revision, Ordering::AcqRel);
                    break;
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(key = %setting.key(), "cannot share a setting with the cluster ({error}); trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}

/// Puts (or deletes) one setting; the bucket's revision of the change, or the entry's
/// revision when the bucket already held the same.
async fn publish_one(
    agent: &Agent,
    settings: &kv::Store,
    modules: &object_store::ObjectStore,
    setting: &Setting,
) -> Result<Option<u64>, String> {
    let key = setting.key();
    let here = local(agent, setting).await?;
    let entry = settings
        .entry(key.clone())
        .await
        .map_err(|e| e.to_string())?;
    let there = entry
        .as_ref()
        .filter(|entry| entry.operation == kv::Operation::Put)
        .and_then(|entry| serde_json::from_slice::<Value>(&entry.value).ok());
    if here == there {
        return Ok(entry.map(|entry| entry.revision));
    }
    match here {
        Some(value) => {
            if let Setting::Module { id, .. } = setting
                && modules.info(id.hex()).await.is_err()
            {
                let bytes = agent
                    .engine()
                    .registry()
                    .bytes(id)
                    .map_err(|e| e.to_string())?;
                modules
                    .put(id.hex().as_str(), &mut &bytes[..])
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let body = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
            let revision = settings
                .put(key, body.into())
                .await
                .map_err(|e| e.to_string())?;
            Ok(Some(revision))
        }
        None => {
            settings
                .delete(key.clone())
                .await
                .map_err(|e| e.to_string())?;
            // A delete answers no revision: the key's newest entry is the delete.
            let entry = settings.entry(key).await.map_err(|e| e.to_string())?;
            Ok(entry.map(|entry| entry.revision))
        }
    }
}

/// Follows every key of the bucket and applies what differs here; what cannot be
/// applied yet is kept and tried again.
async fn follow(
    settings: kv::Store,
    modules: object_store::ObjectStore,
    agent: Weak<Agent>,
    revisions: Arc<Revisions>,
) {
    // Key -> (revision, value, since when) of entries not applied yet.
    let mut waiting: BTreeMap<String, Waiting> = BTreeMap::new();
    // The newest revision seen.
    let mut seen = 0;
    // Events wait for the settings applied through their revision; an entry that cannot
    // be applied here for long (a hook this agent does not declare, a manifest over its
    // policy) stops holding them back.
    let advance = |waiting: &BTreeMap<String, Waiting>, seen: u64| {
        let through = waiting
            .values()
            .filter(|(_, _, since)| since.elapsed() < HOLD_BACK)
            .map(|(revision, _, _)| revision - 1)
            .min()
            .unwrap_or(seen)
            .min(seen);
        revisions.applied.fetch_max(through, Ordering::AcqRel);
    };
    loop {
        let mut watch = match settings.watch_with_history(">").await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::warn!("cannot follow the cluster's settings: {error}");
                tokio::time::sleep(RETRY_EVERY).await;
                continue;
            }
        };
        let mut retry = tokio::time::interval(RETRY_EVERY);
        loop {
            tokio::select! {
                entry = watch.next() => {
                    let Some(Ok(entry)) = entry else { break };
                    let value = match entry.operation {
                        kv::Operation::Put => serde_json::from_slice::<Value>(&entry.value).ok(),
                        kv::Operation::Delete | kv::Operation::Purge => None,
                    };
                    waiting.remove(&entry.key);
                    seen = seen.max(entry.revision);
                    revisions.seen.fetch_max(seen, Ordering::AcqRel);
                    let Some(agent) = agent.upgrade() else { return };
                    if let Err(error) = apply(&agent, &modules, &entry.key, value.clone()).await {
                        tracing::debug!(key = %entry.key, "a shared setting waits: {error}");
                        waiting.insert(
                            entry.key,
                            (entry.revision, value, tokio::time::Instant::now()),
                        );
                    }
                    advance(&waiting, seen);
                }
                _ = retry.tick(), if !waiting.is_empty() => {
                    let Some(agent) = agent.upgrade() else { return };
                    for (key, (revision, value, since)) in std::mem::take(&mut waiting) {
                        if let Err(error) = apply(&agent, &modules, &key, value.clone()).await {
                            let waited = since.elapsed();
                            if (HOLD_BACK..HOLD_BACK + RETRY_EVERY).contains(&waited) {
                                tracing::warn!(%key, "a shared setting cannot be applied here: {error}");
                            }
                            waiting.insert(key, (revision, value, since));
                        }
                    }
                    advance(&waiting, seen);
                }
            }
        }
        tracing::warn!("lost the cluster's settings; following them again");
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
