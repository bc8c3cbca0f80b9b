//! Cluster mode on NATS JetStream: many agents serving the same tenants, as one
//! organisation (one identity, checked at join).
//!
//! - **Events** posted to any agent go into one JetStream stream (`DEADLIFT_EVENTS`,
//!   subject `deadlift.events.<tenant>`), each with a `Nats-Msg-Id` made of its tenant,
//!   source and id, so that the same event posted twice, to the same agent or another,
//!   is stored once within the stream's duplicate window. An agent answers `202` only
//!   once the stream has acknowledged the event (replicated, on an R3 stream).
//! - **Ingest** (`ingest.rs`): every agent pulls from one shared durable consumer
//!   (`deadlift-ingest`), so each stored event is leased to one agent, which journals it
//!   in its own SQLite (routing it to workflows and starting runs there, in one
//!   transaction) and acknowledges it only once those runs have ended and its outbox
//!   entries are in the cluster, telling the cluster it is still at work meanwhile. An
//!   agent that dies first loses the event to another agent when the consumer's ack wait
//!   ends, which takes its runs over after their last journaled step (`runs.rs`).
//! - **The outbox** (`outbox.rs`) goes through the cluster: any agent delivers any
//!   entry, one at a time.
//! - **The v1 NATS trigger** (`v1_trigger.rs`): a message published on a NATS core
//!   subject equal to a v1 workflow's first module's subject becomes a `v1` event of
//!   that type (in a queue group, so one agent takes it), which starts the workflow at
//!   its second module.
//! - **Settings** (`setting.rs`, `shared.rs`) and **history** (`history.rs`): every agent
//!   follows the shared settings, and stores the runs the others finish, so any agent
//!   answers for the cluster's runs.
//!
//! - **Plug-in KV** (`plugin_kv.rs`) is the cluster's.
//!
//! - **Events from elsewhere**: a module's `emit` outside a run, and a peer's delivery to
//!   any agent, go to the events stream too.
//!
//! A dead letter shows on every agent (`history.rs`) but is replayed by the agent that
//! ran its run. v1 workflows are shared settings under ids from a cluster-wide counter
//! ([`Cluster::next_v1_id`]).

mod history;
mod ingest;
mod outbox;
mod plugin_kv;
mod runs;
mod setting;
mod shared;
mod v1_trigger;

pub use setting::Setting;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::workflow::{CloudEvent, Ingested, Journal, Runtime};
use deadlift_engine::Code;

/// The stream every agent publishes events to.
pub const EVENTS_STREAM: &str = "DEADLIFT_EVENTS";
/// Events of tenant `t` are stored under `deadlift.events.t`.
const EVENTS_SUBJECT: &str = "deadlift.events";
/// The durable consumer all agents pull events from.
pub const INGEST_CONSUMER: &str = "deadlift-ingest";
/// Events one agent journals at once (each waits for its commit before its ack).
const INGESTING: usize = 256;
/// The KV bucket where an agent claims a scheduled firing before it fires it.
pub const FIRINGS_BUCKET: &str = "deadlift-firings";
/// How long a claim is kept: longer than any two agents' clocks disagree.
const FIRINGS_KEPT: Duration = Duration::from_secs(24 * 60 * 60);
/// The header naming the peer that delivered an event to an agent of the cluster.
const FROM_PEER: &str = "Deadlift-From-Peer";
/// The header carrying the settings revision an event's agent knew when it stored it.
const SETTINGS_REVISION: &str = "Deadlift-Settings-Revision";
/// How long an agent waits to catch up with an event's settings before it hands the event
/// back to the cluster.
const CATCH_UP: Duration = Duration::from_secs(5);

/// How an agent joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:4222`); the client fails over among them.
    pub urls: Vec<String>,
    /// A NATS credentials file (a user JWT and its NKey seed).
    pub credentials: Option<PathBuf>,
    /// Replicas of the streams this agent creates: 1 on a single server, 3 on a cluster
    /// of three or more (what survives a server's loss).
    pub replicas: usize,
    /// How long the stream recognises an event id it has stored.
    pub dedupe_window: Duration,
    /// How long finished runs stay in the cluster's history stream (an agent away longer
    /// misses older ones).
    pub history_kept: Duration,
    /// How long an event may be in an agent's hands without news (it says every third of
    /// this that its runs are still going) before the cluster hands it to another agent:
    /// how soon the events of an agent that died run elsewhere.
    pub ack_wait: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            credentials: None,
            replicas: 1,
            dedupe_window: Duration::from_secs(2 * 60 * 60),
            history_kept: Duration::from_secs(7 * 24 * 60 * 60),
            ack_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
    #[error("JetStream refused the agent's streams: {0}")]
    Setup(String),
    #[error("the cluster did not store the event: {0}")]
    Publish(String),
    /// An event larger than the NATS servers take (their `max_payload`).
    #[error("event `{id}` is {size} bytes; the cluster's servers take at most {limit}")]
    TooLarge {
        id: String,
        size: usize,
        limit: usize,
    },
    #[error("this agent is in a cluster already")]
    Joined,
    /// Peers know a cluster by one name and key, whichever agent delivers.
    #[error(
        "this agent is `{ours}`, but the cluster's agents are `{theirs}`: every agent of a cluster needs the same name and identity key (copy identity.key from another agent's data directory)"
    )]
    Identity { ours: String, theirs: String },
}

impl ClusterError {
    pub fn code(&self) -> Code {
        match self {
            Self::Publish(_) => Code::ClusterUnavailable,
            Self::TooLarge { .. } => Code::PayloadTooLarge,
            _ => Code::Internal,
        }
    }
}

/// This agent's membership of a cluster.
#[derive(Debug)]
pub struct Cluster {
    /// What the agents agree on: the identity, the next v1 workflow id.
    agreed: async_nats::jetstream::kv::Store,
    /// Flips to true when the agent leaves: the events it holds go back at once.
    leaving: tokio::sync::watch::Sender<bool>,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    shared: shared::Shared,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Cluster {
    /// Connects, makes sure the stream and the shared consumer exist, and starts pulling
    /// events and serving the v1 trigger.
    pub(crate) async fn join(
        config: &ClusterConfig,
        agent: &Arc<crate::Agent>,
    ) -> Result<Arc<Self>, ClusterError> {
        let journal: Journal = agent.workflows().journal().clone();
        let runtime: &Runtime = agent.workflows();
        let urls = config.urls.join(",");
        let connect_error = |message: String| ClusterError::Connect {
            urls: urls.clone(),
            message,
        };
        let mut options = async_nats::ConnectOptions::new()
            .name("deadlift")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5));
        if let Some(path) = &config.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| connect_error(format!("credentials {}: {e}", path.display())))?;
        }
        let addresses: Vec<async_nats::ServerAddr> = config
            .urls
            .iter()
            .map(|url| {
                url.parse()
                    .map_err(|e| connect_error(format!("{url}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            async_nats::connect_with_options(addresses, options),
        )
        .await
        .map_err(|_| connect_error("no server answered within 10 s".into()))?
        .map_err(|e| connect_error(e.to_string()))?;
        let jetstream = jetstream::new(client.clone());
        let events = jetstream
            .get_or_create_stream(stream::Config {
                name: EVENTS_STREAM.into(),
                subjects: vec![format!("{EVENTS_SUBJECT}.*")],
                storage: stream::StorageType::File,
                num_replicas: config.replicas.max(1),
                duplicate_window: config.dedupe_window,
                // Work-queue retention: an event acknowledged by the agent that
                // journaled it leaves the stream (that agent's journal keeps it).
                retention: stream::RetentionPolicy::WorkQueue,
                ..stream::Config::default()
            })
            .await
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        let ingest: consumer::PullConsumer = events
            .get_or_create_consumer(
                INGEST_CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(INGEST_CONSUMER.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_ack_pending: 4096,
                    ..consumer::pull::Config::default()
                },
            )
            .await
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        let agreed =
            check_identity(&jetstream, config.replicas, agent.federation().identity()).await?;
        let firings = jetstream
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: FIRINGS_BUCKET.into(),
                history: 1,
                max_age: FIRINGS_KEPT,
                num_replicas: config.replicas.max(1),
                storage: stream::StorageType::File,
                ..async_nats::jetstream::kv::Config::default()
            })
            .await
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        runtime.claim_firings_with(Arc::new(Firings(firings)));
        let member = member_id(agent.data_dir())?;
        let (sharer, mut tasks) = history::start(
            &jetstream,
            config.replicas,
            config.history_kept,
            &member,
            runtime,
        )
        .await?;
        let seed = setting::local_settings(agent).await?;
        let (shared, sharing) =
            shared::Shared::start(&jetstream, config.replicas, Arc::downgrade(agent), seed).await?;
        tasks.extend(sharing);
        // A canary this agent rolls back by itself is shared too.
        let (released, mut rolled_back) = tokio::sync::mpsc::unbounded_channel();
        agent.releases().tell_changes(released);
        let weak = Arc::downgrade(agent);
        tasks.push(tokio::spawn(async move {
            while let Some((tenant, name)) = rolled_back.recv().await {
                let Some(agent) = weak.upgrade() else { return };
                agent.changed(Setting::Release { tenant, name }).await;
            }
        }));
        let events_created = events.cached_info().created.unix_timestamp_nanos() as i64;
        let steps = runs::StepJournal::start(
            &jetstream,
            config.replicas,
            config.history_kept,
            events_created,
            shared.revisions.clone(),
        )
        .await?;
        let plugin_kv =
            plugin_kv::PluginKv::start(&jetstream, config.replicas, agent.db(), &agreed, &member)
                .await?;
        agent.db().share_kv(Arc::new(plugin_kv));
        let (forwarder, delivering) = outbox::start(
            &jetstream,
            config.replicas,
            config.dedupe_window,
            Arc::downgrade(agent),
        )
        .await?;
        agent.federation().forward_with(Arc::new(forwarder));
        tasks.push(delivering);
        let (leaving, left) = tokio::sync::watch::channel(false);
        let cluster = Arc::new(Self {
            agreed,
            leaving,
            client: client.clone(),
            jetstream,
            shared,
            tasks: Mutex::new(tasks),
        });
        agent
            .federation()
            .receive_into(Arc::new(Inbox(Arc::downgrade(&cluster))));
        journal.emit_to(Arc::new(Outlet {
            cluster: Arc::downgrade(&cluster),
            runtime: tokio::runtime::Handle::current(),
        }));
        let pulling = tokio::spawn(ingest::pull_events(
            ingest,
            ingest::Ingest {
                agent: Arc::downgrade(agent),
                journal,
                revisions: cluster.shared.revisions.clone(),
                sharer,
                steps,
                ack_wait: config.ack_wait,
                left,
            },
        ));
        let triggering = tokio::spawn(v1_trigger::run(
            client,
            Arc::downgrade(&cluster),
            runtime.v1_triggers(),
        ));
        cluster.tasks.lock().extend([pulling, triggering]);
        Ok(cluster)
    }

    /// Stores `events` of `tenant` in the cluster's stream; answers once the stream has
    /// acknowledged each. `runs` stays empty: whichever agent ingests an event starts
    /// its runs.
    pub async fn publish(
        &self,
        tenant: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<Ingested>, ClusterError> {
        self.publish_from(tenant, events, None).await
    }

    /// [`publish`](Self::publish), for events a peer delivered to this agent (`from_peer`):
    /// deduplicated among that peer's ids, stored as the peer's wherever they are
    /// journaled.
    async fn publish_from(
        &self,
        tenant: &str,
        events: Vec<CloudEvent>,
        from_peer: Option<&str>,
    ) -> Result<Vec<Ingested>, ClusterError> {
        let subject = format!("{EVENTS_SUBJECT}.{tenant}");
        // Every event fits, or none is stored: the caller gets one answer for the batch.
        // (Headers take a little of the servers' limit too.)
        let limit = self.client.server_info().max_payload.saturating_sub(1024);
        let mut bodies = Vec::with_capacity(events.len());
        for event in &events {
            let body =
                serde_json::to_vec(event).map_err(|e| ClusterError::Publish(e.to_string()))?;
            if body.len() > limit {
                return Err(ClusterError::TooLarge {
                    id: event.id.clone(),
                    size: body.len(),
                    limit,
                });
            }
            bodies.push(body);
        }
        // The settings as they are now, whichever agent changed them: the agent that
        // journals the events applies as far first.
        let revision = self.shared.newest().await;
        let mut pending = Vec::with_capacity(events.len());
        for (event, body) in events.iter().zip(bodies) {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", message_id(tenant, from_peer, event).as_str());
            headers.insert(SETTINGS_REVISION, revision.to_string().as_str());
            if let Some(peer) = from_peer {
                headers.insert(FROM_PEER, peer);
            }
            let ack = self
                .jetstream
                .publish_with_headers(subject.clone(), headers, body.into())
                .await
                .map_err(|e| ClusterError::Publish(e.to_string()))?;
            pending.push(ack);
        }
        let mut ingested = Vec::with_capacity(events.len());
        for (event, ack) in events.iter().zip(pending) {
            let ack = ack
                .await
                .map_err(|e| ClusterError::Publish(e.to_string()))?;
            ingested.push(Ingested {
                id: event.id.clone(),
                duplicate: ack.duplicate,
                runs: Vec::new(),
                clustered: true,
            });
        }
        Ok(ingested)
    }

    /// The next v1 workflow id, one space for the cluster (above `at_least`, this
    /// agent's own highest): a counter in the `deadlift-cluster` bucket, taken by
    /// compare-and-set.
    pub async fn next_v1_id(&self, at_least: i64) -> Result<i64, ClusterError> {
        const KEY: &str = "v1-workflow-id";
        let failed = |e: &dyn std::fmt::Display| ClusterError::Publish(e.to_string());
        for _ in 0..100 {
            let entry = self.agreed.entry(KEY).await.map_err(|e| failed(&e))?;
            let current = entry
                .as_ref()
                .filter(|entry| entry.operation == async_nats::jetstream::kv::Operation::Put)
                .and_then(|entry| std::str::from_utf8(&entry.value).ok()?.parse::<i64>().ok())
                .unwrap_or(0);
            let next = current.max(at_least) + 1;
            let taken = match &entry {
                Some(entry) => self
                    .agreed
                    .update(KEY, next.to_string().into(), entry.revision)
                    .await
                    .is_ok(),
                None => self
                    .agreed
                    .create(KEY, next.to_string().into())
                    .await
                    .is_ok(),
            };
            if taken {
                return Ok(next);
            }
        }
        Err(ClusterError::Publish(
            "another agent kept taking the next v1 workflow id".into(),
        ))
    }

    /// A setting changed through this agent: the cluster gets it. Answers once the
    /// cluster holds it.
    pub async fn changed(&self, setting: Setting) {
        self.shared.changed(setting).await;
    }

    /// Stops pulling and triggering, hands back the events whose runs are still going
    /// here (their next holder takes the runs over), and flushes what the client still
    /// holds, for a moment at most: with every NATS server gone a flush would wait for
    /// ever.
    pub async fn leave(&self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
        // The events whose runs are still going here go back to the cluster.
        self.leaving.send_replace(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

/// This agent's name among the cluster's members (its history consumer's, for one),
/// made at its first join and kept in its data directory: the agents share an identity,
/// so that cannot tell them apart.
fn member_id(data_dir: &std::path::Path) -> Result<String, ClusterError> {
    let path = data_dir.join("cluster-member.id");
    let failed = |e: std::io::Error| ClusterError::Setup(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => Err(ClusterError::Setup(format!("{} is empty", path.display()))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let id = crate::workflow::event::new_id("")[12..].to_owned();
            std::fs::write(&path, &id).map_err(failed)?;
            Ok(id)
        }
        Err(error) => Err(failed(error)),
    }
}

/// The KV bucket holding what all agents of the cluster must agree on.
pub const CLUSTER_BUCKET: &str = "deadlift-cluster";

/// The first agent to join names the cluster's identity; the others must have it too,
/// since a peer checks every delivery against one registered name and key.
async fn check_identity(
    jetstream: &jetstream::Context,
    replicas: usize,
    identity: &crate::federation::Identity,
) -> Result<async_nats::jetstream::kv::Store, ClusterError> {
    let setup = |e: &dyn std::fmt::Display| ClusterError::Setup(e.to_string());
    let bucket = jetstream
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: CLUSTER_BUCKET.into(),
            history: 1,
            num_replicas: replicas.max(1),
            storage: stream::StorageType::File,
            ..async_nats::jetstream::kv::Config::default()
        })
        .await
        .map_err(|e| setup(&e))?;
    let ours = format!("{} ({})", identity.name, identity.public_key());
    match bucket.create("identity", ours.clone().into()).await {
        Ok(_) => Ok(bucket),
        Err(error) if error.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
            let theirs = bucket
                .get("identity")
                .await
                .map_err(|e| setup(&e))?
                .map(|value| String::from_utf8_lossy(&value).into_owned())
                .unwrap_or_default();
            if theirs == ours {
                Ok(bucket)
            } else {
                Err(ClusterError::Identity { ours, theirs })
            }
        }
        Err(error) => Err(setup(&error)),
    }
}

/// Reads what `stream` holds now under `filter` (`deliver` says which messages: all,
/// or the newest per subject), `most` messages at most, through a short-lived consumer
/// of its own. For reads of a few messages off the hot path (a run taken over, a KV key
/// listing).
async fn read_now(
    stream: &stream::Stream,
    filter: String,
    deliver: consumer::DeliverPolicy,
    headers_only: bool,
    most: usize,
) -> Result<Vec<jetstream::Message>, String> {
    let mut reader = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: filter,
            deliver_policy: deliver,
            ack_policy: consumer::AckPolicy::None,
            headers_only,
            inactive_threshold: Duration::from_secs(30),
            ..consumer::pull::Config::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let pending = (reader.info().await.map_err(|e| e.to_string())?.num_pending as usize).min(most);
    let mut read = Vec::with_capacity(pending);
    while read.len() < pending {
        let mut batch = reader
            .fetch()
            .max_messages(pending - read.len())
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let before = read.len();
        while let Some(message) = batch.next().await {
            read.push(message.map_err(|e| e.to_string())?);
        }
        if read.len() == before {
            return Err(format!("read {before} of {pending} messages"));
        }
    }
    Ok(read)
}

/// The stream's deduplication key of an event: its tenant, source and id (hashed, so that
/// any source fits a header).
fn message_id(tenant: &str, from_peer: Option<&str>, event: &CloudEvent) -> String {
    let mut digest = Sha256::new()
        .chain_update(tenant.as_bytes())
        .chain_update([0]);
    match from_peer {
        // A peer's ids are its own (as in the journal): the source is the peer's to say.
        Some(peer) => digest.update([&[1], peer.as_bytes()].concat()),
        None => digest.update(event.source.as_bytes()),
    }
    hex::encode(
        digest
            .chain_update([0])
            .chain_update(event.id.as_bytes())
            .finalize(),
    )
}

/// Events modules emit outside runs, stored in the cluster (`workflow::EventOutlet`).
#[derive(Debug)]
struct Outlet {
    cluster: std::sync::Weak<Cluster>,
    runtime: tokio::runtime::Handle,
}

/// How long a module's `emit` outside a run waits for the cluster.
const EMIT_WAIT: Duration = Duration::from_secs(10);

impl crate::workflow::EventOutlet for Outlet {
    fn publish_blocking(&self, tenant: &str, event: CloudEvent) -> Result<(), String> {
        let cluster = self.cluster.upgrade().ok_or("the agent left the cluster")?;
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        let tenant = tenant.to_owned();
        self.runtime.spawn(async move {
            let stored = cluster.publish(&tenant, vec![event]).await;
            let _ = answer.send(stored.map(drop).map_err(|e| e.to_string()));
        });
        answered.recv_timeout(EMIT_WAIT).map_err(|_| {
            format!(
                "the cluster did not store the event within {} s",
                EMIT_WAIT.as_secs()
            )
        })?
    }
}

/// Peers' deliveries, stored in the cluster ([`Cluster::publish_from`]).
#[derive(Debug)]
struct Inbox(std::sync::Weak<Cluster>);

#[async_trait::async_trait]
impl crate::federation::ClusterInbox for Inbox {
    async fn store(
        &self,
        peer: &crate::federation::Peer,
        events: Vec<CloudEvent>,
    ) -> Result<Vec<Ingested>, String> {
        let cluster = self.0.upgrade().ok_or("the agent left the cluster")?;
        cluster
            .publish_from(&peer.tenant, events, Some(&peer.name))
            .await
            .map_err(|e| e.to_string())
    }
}

/// Scheduled firings claimed in a KV bucket: the first agent to create a firing's key
/// fires it, and the others skip it. A claim that cannot be made (NATS unreachable) is
/// skipped too: a firing is missed rather than doubled, as one missed while the agent
/// was down is.
#[derive(Debug)]
struct Firings(async_nats::jetstream::kv::Store);

#[async_trait::async_trait]
impl crate::workflow::FiringClaims for Firings {
    async fn claim(&self, tenant: &str, workflow: &str, fire_unix_ms: i64) -> bool {
        // Workflow names may hold characters a key may not: the key is a hash.
        let digest = Sha256::new()
            .chain_update(tenant.as_bytes())
            .chain_update([0])
            .chain_update(workflow.as_bytes())
            .finalize();
        let key = format!("{}.{fire_unix_ms}", hex::encode(digest));
        match self.0.create(key, bytes::Bytes::new()).await {
            Ok(_) => true,
            Err(error)
                if error.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists =>
            {
                false
            }
            Err(error) => {
                tracing::warn!(%tenant, %workflow, "cannot claim a scheduled firing ({error}); skipped");
                false
            }
        }
    }
}
