//! Federation between agents, behind one façade, [`Federation`]: this agent's
//! [`Identity`], its peers (other agents, with the subjects that flow each way), the
//! outbox and its signed delivery ([`Webhook`]), replay of dead deliveries, and the
//! checks on receipt.
//!
//! The journal writer knows one thing of federation: when it commits an event, it puts
//! the event in the outbox of each peer it is sent to, in the same transaction
//! (`peers::enqueue`, reading the [`PeerDirectory`]). Everything else (peers, delivery
//! attempts, replays) is written by this module, through the writer's generic write so
//! that it shares its group commits. Peer and outbox SQL lives in `peers.rs`, the
//! delivery loop in `deliver.rs`.

pub mod deliver;
mod identity;
pub mod peers;
pub mod views;
mod webhook;

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

pub use deliver::DeliveryConfig;
pub use identity::{Identity, IdentityError, parse_public_key};
pub use peers::{OutboxEntry, OutboxStatus, Peer};
pub use views::{PeerTrace, PeerTraceError, PeerView, TraceView};
pub use webhook::{
    ID_HEADER, PEER_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE_SECS, Webhook,
};

use crate::clock::now_ms;
use crate::store::{Database, DbError};
use crate::workflow::event::{EventError, parse_events};
use crate::workflow::{Ingested, Journal};
use deadlift_engine::Code;

/// Where a peer's checked delivery goes in cluster mode: the cluster's events stream,
/// from which any agent runs it (as the peer's, never sent back to it).
#[async_trait::async_trait]
pub trait ClusterInbox: Send + Sync + std::fmt::Debug {
    /// Stores the events; answers once the cluster holds every one.
    async fn store(
        &self,
        peer: &Peer,
        events: Vec<crate::workflow::CloudEvent>,
    ) -> Result<Vec<Ingested>, String>;
}

/// What a delivery from a peer did: the events committed, and those refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Received {
    pub events: Vec<Ingested>,
    /// Events of the delivery that were not committed, each with its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refused>,
}

/// An event of a delivery that the receiver refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Refused {
    pub id: String,
    pub code: Code,
    pub message: String,
}

/// Why a federation operation or a delivery from a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("the peer is invalid: {0}")]
    PeerInvalid(String),
    #[error("no peer named `{0}`")]
    PeerNotFound(String),
    /// A delivery names no known peer.
    #[error("{0}")]
    PeerUnknown(String),
    #[error("{0}")]
    SignatureInvalid(String),
    #[error("{0}")]
    SignatureExpired(String),
    #[error("{0}")]
    EventNotAccepted(String),
    #[error("the stored key of peer `{peer}` is unusable: {reason}")]
    StoredKey { peer: String, reason: String },
    #[error("delivery {0} is not dead, so it cannot be replayed")]
    DeliveryNotDead(i64),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Db(#[from] DbError),
    /// The cluster did not store a delivery (cluster mode).
    #[error("the cluster did not store the delivery: {0}")]
    Cluster(String),
}

impl FederationError {
    pub fn code(&self) -> Code {
        match self {
            Self::PeerInvalid(_) => Code::PeerInvalid,
            Self::PeerNotFound(_) => Code::PeerNotFound,
            Self::PeerUnknown(_) => Code::PeerUnknown,
            Self::SignatureInvalid(_) => Code::SignatureInvalid,
            Self::SignatureExpired(_) => Code::SignatureExpired,
            Self::EventNotAccepted(_) => Code::EventNotAccepted,
            Self::StoredKey { .. } => Code::Internal,
            Self::DeliveryNotDead(_) => Code::DeliveryNotDead,
            Self::Event(error) => error.code(),
            Self::Db(error) => error.code(),
            Self::Cluster(_) => Code::ClusterUnavailable,
        }
    }
}

/// The peers, in memory and in step with the database: the journal writer reads it to
/// fill outboxes, emit steps to check their `to`, receipt to find the sender's key.
#[derive(Debug, Clone, Default)]
pub struct PeerDirectory(Arc<RwLock<Vec<Peer>>>);

impl PeerDirectory {
    pub(crate) fn new(mut peers: Vec<Peer>) -> Self {
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        Self(Arc::new(RwLock::new(peers)))
    }

    /// Every peer, by name.
    pub fn all(&self) -> Vec<Peer> {
        self.0.read().clone()
    }

    pub fn get(&self, name: &str) -> Option<Peer> {
        self.0.read().iter().find(|p| p.name == name).cloned()
    }

    /// `peer`, if it exists and serves `tenant` (an `emit` step's `to`).
    fn serving(&self, peer: &str, tenant: &str) -> Result<Peer, String> {
        match self.get(peer) {
            Some(p) if p.tenant == tenant => Ok(p),
            Some(_) => Err(format!("peer `{peer}` does not serve tenant `{tenant}`")),
            None => Err(format!("no peer named `{peer}`")),
        }
    }

    /// Whether `peer` exists and serves `tenant`.
    pub fn check_serves(&self, peer: &str, tenant: &str) -> Result<(), String> {
        self.serving(peer, tenant).map(drop)
    }

    /// Whether `peer` serves `tenant` and is sent events of `event_type` (its send
    /// patterns hold for events addressed to it too).
    pub fn check_sends(&self, peer: &str, tenant: &str, event_type: &str) -> Result<(), String> {
        if self.serving(peer, tenant)?.sends(event_type) {
            Ok(())
        } else {
            Err(format!(
                "peer `{peer}` is not sent events of type `{event_type}` (see its send patterns)"
            ))
        }
    }

    /// Looks at the peers without copying them (the writer, once per event).
    pub(crate) fn with<T>(&self, look: impl FnOnce(&[Peer]) -> T) -> T {
        look(&self.0.read())
    }

    fn upsert(&self, peer: Peer) {
        let mut peers = self.0.write();
        peers.retain(|p| p.name != peer.name);
        let at = peers.partition_point(|p| p.name < peer.name);
        peers.insert(at, peer);
    }

    fn remove(&self, name: &str) {
        self.0.write().retain(|p| p.name != name);
    }
}

/// Federation with other agents: the façade the server and embedders use.
#[derive(Debug)]
pub struct Federation {
    identity: Identity,
    db: Database,
    journal: Journal,
    peers: PeerDirectory,
    /// Told when the outbox has new work (wakes the deliverer).
    outbox_ready: Arc<Notify>,
    deliverer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Asks peers for their side of a trace (`views`).
    views_http: reqwest::Client,
    /// Set when the agent joins a cluster: the outbox goes there.
    forwarding: deliver::Forwarding,
    /// Set when the agent joins a cluster: peers' deliveries go there.
    inbox: std::sync::OnceLock<Arc<dyn ClusterInbox>>,
    config: DeliveryConfig,
}

impl Federation {
    /// Starts the deliverer. Needs a Tokio runtime.
    pub(crate) fn start(
        identity: Identity,
        db: Database,
        journal: Journal,
        peers: PeerDirectory,
        outbox_ready: Arc<Notify>,
        config: DeliveryConfig,
    ) -> Self {
        let forwarding = deliver::Forwarding::default();
        let deliverer = tokio::spawn(deliver::run(
            db.clone(),
            identity.clone(),
            journal.clone(),
            peers.clone(),
            outbox_ready.clone(),
            config.clone(),
            forwarding.clone(),
        ));
        Self {
            identity,
            db,
            journal,
            peers,
            outbox_ready,
            deliverer: Mutex::new(Some(deliverer)),
            views_http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            forwarding,
            inbox: std::sync::OnceLock::new(),
            config,
        }
    }

    /// From now on peers' deliveries are stored in the cluster, which runs them anywhere.
    pub(crate) fn receive_into(&self, inbox: Arc<dyn ClusterInbox>) {
        let _ = self.inbox.set(inbox);
    }

    /// From now on the outbox is handed to the cluster (`deliver::OutboxForwarder`).
    pub(crate) fn forward_with(&self, forwarder: Arc<dyn deliver::OutboxForwarder>) {
        let _ = self.forwarding.set(forwarder);
        self.outbox_ready.notify_one();
    }

    /// How deliveries are retried.
    pub(crate) fn delivery_config(&self) -> &DeliveryConfig {
        &self.config
    }

    /// The journal deliveries are recorded through.
    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Whether an outbox entry of this tenant's event still waits to be handed to the
    /// cluster. A tenant without peers (most events) is answered from memory.
    pub(crate) async fn unforwarded(
        &self,
        tenant: &str,
        event_id: &str,
    ) -> Result<bool, FederationError> {
        if !self
            .peers
            .with(|all| all.iter().any(|peer| peer.tenant == tenant))
        {
            return Ok(false);
        }
        let (db, tenant, event_id) = (self.db.clone(), tenant.to_owned(), event_id.to_owned());
        Ok(
            tokio::task::spawn_blocking(move || peers::unforwarded(&db.read(), &tenant, &event_id))
                .await??,
        )
    }

    /// This agent's identity (name and signing key).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Registers (or replaces) a peer.
    pub async fn add_peer(&self, peer: Peer) -> Result<Peer, FederationError> {
        peer.validate().map_err(FederationError::PeerInvalid)?;
        let db = self.db.clone();
        let tenant = peer.tenant.clone();
        if !tokio::task::spawn_blocking(move || db.tenant_exists(&tenant)).await?? {
            return Err(FederationError::PeerInvalid(format!(
                "tenant: no tenant named `{}`",
                peer.tenant
            )));
        }
        let now = now_ms();
        let stored = self
            .journal
            .write(move |tx| {
                peers::upsert_peer(tx, &peer, now)?;
                peers::get_peer(tx, &peer.name)?
                    .ok_or_else(|| DbError::Corrupt("a peer vanished as it was stored".into()))
            })
            .await?;
        self.peers.upsert(stored.clone());
        Ok(stored)
    }

    pub async fn remove_peer(&self, name: &str) -> Result<(), FederationError> {
        let owned = name.to_owned();
        let removed = self
            .journal
            .write(move |tx| peers::remove_peer(tx, &owned))
            .await?;
        self.peers.remove(name);
        removed
            .then_some(())
            .ok_or_else(|| FederationError::PeerNotFound(name.to_owned()))
    }

    /// Every peer, by name.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.all()
    }

    pub fn peer(&self, name: &str) -> Option<Peer> {
        self.peers.get(name)
    }

    /// The peer `name` if it serves `tenant`; to anyone else it does not exist.
    fn peer_of(&self, tenant: &str, name: &str) -> Result<Peer, FederationError> {
        self.peers
            .get(name)
            .filter(|peer| peer.tenant == tenant)
            .ok_or_else(|| FederationError::PeerNotFound(name.to_owned()))
    }

    /// Stores the token `tenant` holds on peer `name`'s agent, with which this agent
    /// fetches that side of a trace for it.
    pub async fn set_view_token(
        &self,
        tenant: &str,
        name: &str,
        token: &str,
    ) -> Result<PeerView, FederationError> {
        let peer = self.peer_of(tenant, name)?;
        if token.is_empty() || token.len() > 512 || token.chars().any(|c| c.is_control()) {
            return Err(FederationError::PeerInvalid(
                "token: 1 to 512 characters, none of them control characters".into(),
            ));
        }
        let (tenant, token, now) = (tenant.to_owned(), token.to_owned(), now_ms());
        let name = peer.name.clone();
        self.journal
            .write(move |tx| views::set_token(tx, &name, &tenant, &token, now))
            .await?;
        Ok(PeerView {
            peer: peer.name,
            url: peer.url,
            updated_unix_ms: now,
        })
    }

    pub async fn remove_view_token(&self, tenant: &str, name: &str) -> Result<(), FederationError> {
        let peer = self.peer_of(tenant, name)?;
        let tenant = tenant.to_owned();
        let removed = self
            .journal
            .write(move |tx| views::remove_token(tx, &peer.name, &tenant))
            .await?;
        removed
            .then_some(())
            .ok_or_else(|| FederationError::PeerNotFound(name.to_owned()))
    }

    /// The peers `tenant` can see a trace on.
    pub async fn views(&self, tenant: &str) -> Result<Vec<PeerView>, FederationError> {
        Ok(self
            .view_tokens(tenant)
            .await?
            .into_iter()
            .map(|(peer, _, updated_unix_ms)| PeerView {
                peer: peer.name,
                url: peer.url,
                updated_unix_ms,
            })
            .collect())
    }

    /// The tenant's view tokens on peers that still serve it.
    async fn view_tokens(&self, tenant: &str) -> Result<Vec<(Peer, String, i64)>, FederationError> {
        let (db, owned) = (self.db.clone(), tenant.to_owned());
        let stored =
            tokio::task::spawn_blocking(move || views::tokens(&db.read(), &owned)).await??;
        Ok(stored
            .into_iter()
            .filter_map(|(name, token, updated)| {
                let peer = self.peer_of(tenant, &name).ok()?;
                Some((peer, token, updated))
            })
            .collect())
    }

    /// Each viewable peer's side of trace `trace_id` for `tenant`, asked at once.
    pub async fn peer_traces(
        &self,
        tenant: &str,
        trace_id: &str,
    ) -> Result<Vec<PeerTrace>, FederationError> {
        let asks = self
            .view_tokens(tenant)
            .await?
            .into_iter()
            .map(|(peer, token, _)| {
                let http = self.views_http.clone();
                let trace_id = trace_id.to_owned();
                async move { views::fetch(&http, &peer, &token, &trace_id).await }
            });
        Ok(futures_util::future::join_all(asks).await)
    }

    /// The outbox, newest first, optionally of one status.
    pub async fn outbox(
        &self,
        status: Option<OutboxStatus>,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, FederationError> {
        let db = self.db.clone();
        Ok(tokio::task::spawn_blocking(move || peers::list(&db.read(), status, limit)).await??)
    }

    /// Deliveries waiting to be sent, to every peer.
    pub async fn outbox_pending(&self) -> Result<u64, FederationError> {
        let db = self.db.clone();
        Ok(tokio::task::spawn_blocking(move || peers::pending(&db.read())).await??)
    }

    /// Sends a dead delivery again.
    pub async fn replay(&self, id: i64) -> Result<(), FederationError> {
        let now = now_ms();
        let replayed = self
            .journal
            .write(move |tx| peers::replay(tx, id, now))
            .await?;
        if !replayed {
            return Err(FederationError::DeliveryNotDead(id));
        }
        self.outbox_ready.notify_one();
        Ok(())
    }

    /// A delivery from a peer: checked (known sender, fresh timestamp, valid signature)
    /// before anything is committed; then each event is judged on its own. Events of a
    /// type the peer may send are stored in the peer's tenant and routed like local
    /// events (never sent back); the others are refused, each with its reason, so that
    /// one refused event does not take its batch down with it. A delivery of one event
    /// that is refused is an error.
    pub async fn receive(
        &self,
        webhook: &Webhook,
        content_type: &str,
        body: &[u8],
    ) -> Result<Received, FederationError> {
        let sender = &webhook.sender;
        let peer = self
            .peers
            .get(sender)
            .ok_or_else(|| FederationError::PeerUnknown(format!("no peer named `{sender}`")))?;
        webhook.check_time(now_ms() / 1000)?;
        let key =
            parse_public_key(&peer.public_key).map_err(|reason| FederationError::StoredKey {
                peer: sender.clone(),
                reason,
            })?;
        if !webhook.verify(&key, body) {
            return Err(FederationError::SignatureInvalid(format!(
                "the signature does not verify with peer `{sender}`'s key"
            )));
        }
        let events = parse_events(content_type, body)?;
        let (accepted, refused): (Vec<_>, Vec<_>) = events
            .into_iter()
            .partition(|e| peer.accepts(&e.event_type));
        let not_accepted = |event_type: &str| {
            format!("peer `{sender}` may not send events of type `{event_type}`")
        };
        if accepted.is_empty()
            && let [event] = refused.as_slice()
        {
            return Err(FederationError::EventNotAccepted(not_accepted(
                &event.event_type,
            )));
        }
        let refused = refused
            .iter()
            .map(|event| Refused {
                id: event.id.clone(),
                code: Code::EventNotAccepted,
                message: not_accepted(&event.event_type),
            })
            .collect();
        let events = if accepted.is_empty() {
            Vec::new()
        } else if let Some(inbox) = self.inbox.get() {
            inbox
                .store(&peer, accepted)
                .await
                .map_err(FederationError::Cluster)?
        } else {
            self.journal.receive(&peer, accepted).await?
        };
        Ok(Received { events, refused })
    }

    /// Stops delivering; entries in flight stay pending and go out at the next start.
    pub(crate) async fn shutdown(&self) {
        let deliverer = self.deliverer.lock().take();
        if let Some(task) = deliverer {
            task.abort();
            let _ = task.await;
        }
    }
}

impl From<tokio::task::JoinError> for FederationError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Db(DbError::from(e))
    }
}
