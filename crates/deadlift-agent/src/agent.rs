//! The agent: an [`Engine`] wired to durable storage in a data directory, with tenants
//! and API tokens, the workflow [`Runtime`], [`Federation`] with other agents, the
//! [`Hooks`] the embedding application declares, and the defaults the server applies.
//! Built by [`AgentBuilder`]; the HTTP server (`deadlift-server`) is one way to drive
//! it, an embedding application is another.

use crate::telemetry::{Telemetry, TelemetryError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::{Cluster, ClusterConfig, ClusterError};
use crate::federation::{DeliveryConfig, Federation, Identity, PeerDirectory, peers};
use crate::hooks::{Hook, HookDecl, Hooks};
use crate::policy::{Policy, PolicyHandle};
use crate::releases::{NameUse, ReleaseError, Releases};
use crate::store::{Database, DbError, Durability, Principal};
use crate::workflow::{Journal, JournalSink, Retention, Runtime, RuntimeConfig};
use deadlift_engine::engine::{Engine, EngineBuilder, EngineError};
use deadlift_engine::grant::Grant;
use deadlift_engine::host::HostFunction;

/// The tenant every agent starts with, for those who need only one.
pub const DEFAULT_TENANT: &str = "default";

/// The tenant the Deadlift v1 routes act for: a tenant of their own, so that the
/// original API's openness never reaches another tenant's modules or workflows.
pub const V1_TENANT: &str = "v1";

/// Who may use the Deadlift v1 routes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum V1Access {
    /// Anyone while the agent listens on a loopback address only (as the original,
    /// which ran next to its callers); otherwise a token of the v1 tenant or an admin's.
    #[default]
    OpenOnLoopback,
    /// Anyone, wherever the agent listens (the original's openness; said at start).
    Open,
    /// Always a token of the v1 tenant or an admin's.
    Token,
}

/// Failures starting an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot generate a token: {0}")]
    Random(String),
    #[error("an agent must be built inside a Tokio runtime (its workflow runtime spawns tasks)")]
    NoRuntime,
    #[error(transparent)]
    Identity(#[from] crate::federation::IdentityError),
    #[error(
        "the admin token is too easy to guess (about {bits} bits); use at least {MIN_TOKEN_BITS} bits, e.g. 32 random characters"
    )]
    WeakToken { bits: u32 },
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

/// The least guessing entropy, in bits, an admin token given by the operator must have.
pub const MIN_TOKEN_BITS: u32 = 128;

/// A rough upper bound of a secret's entropy in bits: its length times the bits of the
/// smaller of the alphabet its character classes span and the characters it uses.
fn estimated_bits(secret: &str) -> u32 {
    let has = |class: fn(&char) -> bool| secret.chars().any(|c| class(&c));
    let alphabet = [
        (has(char::is_ascii_lowercase), 26),
        (has(char::is_ascii_uppercase), 26),
        (has(char::is_ascii_digit), 10),
        (has(|c| !c.is_ascii_alphanumeric()), 33),
    ]
    .iter()
    .filter(|(present, _)| *present)
    .map(|(_, size)| size)
    .sum::<u32>();
    let distinct = secret
        .chars()
        .collect::<std::collections::HashSet<_>>()
        .len() as u32;
    let per_char = f64::from(alphabet.min(distinct).max(1)).log2();
    (secret.chars().count() as f64 * per_char) as u32
}

/// Builds an [`Agent`].
#[derive(Debug)]
pub struct AgentBuilder {
    data_dir: PathBuf,
    admin_token: Option<String>,
    v1_access: V1Access,
    default_grant: Grant,
    max_body_bytes: usize,
    /// The engine's settings; the agent adds its storage when it builds.
    engine: EngineBuilder,
    runtime: RuntimeConfig,
    delivery: DeliveryConfig,
    durability: Durability,
    name: String,
    hooks: Vec<HookDecl>,
    policy: Policy,
    otlp_endpoint: Option<String>,
}

impl AgentBuilder {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            admin_token: None,
            v1_access: V1Access::default(),
            default_grant: Grant::default(),
            max_body_bytes: 16 * 1024 * 1024,
            engine: EngineBuilder::default(),
            runtime: RuntimeConfig::default(),
            delivery: DeliveryConfig::default(),
            durability: Durability::default(),
            name: "deadlift".into(),
            hooks: Vec::new(),
            policy: Policy::default(),
            otlp_endpoint: None,
        }
    }

    /// The operator's ceilings on the grants tenants write.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Use this admin token instead of generating one at first start.
    pub fn admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = token;
        self
    }

    /// Whether the Deadlift v1 routes need a token (the original needed none).
    pub fn v1_requires_token(mut self, required: bool) -> Self {
        if required {
            self.v1_access = V1Access::Token;
        }
        self
    }

    /// Who may use the Deadlift v1 routes.
    pub fn v1_access(mut self, access: V1Access) -> Self {
        self.v1_access = access;
        self
    }

    /// The grant applied to calls made through the API.
    pub fn default_grant(mut self, grant: Grant) -> Self {
        self.default_grant = grant;
        self
    }

    /// Largest request body the server accepts.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    pub fn workers(self, workers: usize) -> Self {
        self.engine(|engine| engine.workers(workers))
    }

    /// Any of the engine's own settings (fair sharing, code cache, module size, …);
    /// the agent sets its storage itself.
    pub fn engine(mut self, configure: impl FnOnce(EngineBuilder) -> EngineBuilder) -> Self {
        self.engine = configure(self.engine);
        self
    }

    pub fn host_function(self, function: HostFunction) -> Self {
        self.engine(|engine| engine.host_function(function))
    }

    /// How much run and event history the agent keeps.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.runtime.retention = retention;
        self
    }

    /// What a committed write (an accepted event, a journaled step) survives; by
    /// default a power loss.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How many workflow runs execute at once.
    pub fn max_concurrent_runs(mut self, runs: usize) -> Self {
        self.runtime.max_concurrent_runs = runs.max(1);
        self
    }

    /// The name events emitted by this agent's runs carry as their source
    /// (`deadlift://<name>`).
    pub fn name(mut self, name: &str) -> Self {
        self.runtime.source = format!("deadlift://{name}");
        self.name = name.to_owned();
        self
    }

    /// Declares an extension point tenants can bind a module function to.
    pub fn hook(mut self, hook: HookDecl) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Exports runs, steps and calls as OpenTelemetry spans to this OTLP/HTTP collector
    /// (its base URL, as in `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn otlp_endpoint(mut self, endpoint: Option<String>) -> Self {
        self.otlp_endpoint = endpoint;
        self
    }

    /// The agent will join a cluster ([`Agent::join_cluster`]): runs it held under a
    /// cluster lease when it stopped are left to the cluster, not resumed here at start.
    pub fn clustered(mut self, clustered: bool) -> Self {
        self.runtime.resume_leased = !clustered;
        self
    }

    /// How deliveries to peers are retried.
    pub fn delivery(mut self, delivery: DeliveryConfig) -> Self {
        self.delivery = delivery;
        self
    }

    /// Opens the data directory and starts the engine. Returns the agent and, when an
    /// admin token was generated now (first start), that token: it is shown only once.
    pub fn build(self) -> Result<(Agent, Option<String>), AgentError> {
        if let Some(token) = &self.admin_token {
            let bits = estimated_bits(token);
            if bits < MIN_TOKEN_BITS {
                return Err(AgentError::WeakToken { bits });
            }
        }
        private_dir(&self.data_dir).map_err(|source| AgentError::DataDir {
            path: self.data_dir.clone(),
            source,
        })?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(AgentError::NoRuntime);
        }
        let db = Database::open_with(&self.data_dir.join("agent.db"), self.durability)?;
        db.create_tenant(DEFAULT_TENANT)?;
        db.create_tenant(V1_TENANT)?;
        let (journal, journal_receiver) = Journal::new(db.clone());
        let engine = self
            .engine
            .data_dir(&self.data_dir)
            .kv(Arc::new(db.clone()))
            .modules(Arc::new(db.clone()))
            .events(Arc::new(JournalSink::new(
                journal.clone(),
                self.runtime.source.clone(),
            )));
        let engine = engine.build()?;
        let new_admin_token = match self.admin_token {
            Some(token) => {
                db.replace_admin_tokens(&token, "given at start")?;
                None
            }
            None if db.has_admin_token()? => None,
            None => {
                let token = new_token()?;
                db.add_token(&token, &Principal::Admin, Some("created at first start"))?;
                Some(token)
            }
        };
        let identity = Identity::load_or_create(&self.data_dir, &self.name)?;
        let peers = PeerDirectory::new(peers::list_peers(&db.read())?);
        // Delivered entries are kept as long as event ids are, for the record.
        let mut delivery = self.delivery;
        delivery.keep_delivered = Duration::from_millis(
            u64::try_from(self.runtime.retention.dedupe_window_ms).unwrap_or(0),
        );
        let policy = PolicyHandle::new(self.policy);
        let tapes = Arc::new(crate::tapes::Tapes::start(
            db.clone(),
            journal.clone(),
            policy.clone(),
        ));
        let releases = Arc::new(Releases::new(db.clone(), engine.clone()));
        let workflows = Runtime::start(
            engine.clone(),
            journal.clone(),
            journal_receiver,
            peers.clone(),
            policy.clone(),
            self.runtime,
            tapes.clone(),
            releases.clone(),
        )?;
        let telemetry = match &self.otlp_endpoint {
            Some(endpoint) => Some(Telemetry::start(
                endpoint,
                &identity.name,
                journal.clone(),
                workflows.subscribe().0,
            )?),
            None => None,
        };
        let federation = Federation::start(
            identity,
            db.clone(),
            journal,
            peers,
            workflows.outbox_ready().clone(),
            delivery,
        );
        let agent = Agent {
            hooks: Hooks::new(self.hooks, db.clone(), engine.clone()),
            policy,
            workflows,
            federation,
            engine,
            db,
            data_dir: self.data_dir,
            v1_access: self.v1_access,
            default_grant: self.default_grant,
            max_body_bytes: self.max_body_bytes,
            telemetry,
            tapes,
            releases,
            cluster: std::sync::OnceLock::new(),
        };
        Ok((agent, new_admin_token))
    }
}

/// Creates the data directory (and its parents) and makes it the owner's alone: it
/// holds the database, the signing key and compiled code.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A fresh random API token (`dl_` and 32 random bytes in hex).
pub fn new_token() -> Result<String, AgentError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| AgentError::Random(e.to_string()))?;
    Ok(format!("dl_{}", hex::encode(bytes)))
}

/// A running agent's state. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Agent {
    hooks: Hooks,
    policy: PolicyHandle,
    workflows: Runtime,
    federation: Federation,
    engine: Engine,
    db: Database,
    data_dir: PathBuf,
    v1_access: V1Access,
    default_grant: Grant,
    max_body_bytes: usize,
    telemetry: Option<Telemetry>,
    tapes: Arc<crate::tapes::Tapes>,
    releases: Arc<Releases>,
    /// Set once the agent joins a cluster.
    cluster: std::sync::OnceLock<Arc<Cluster>>,
}

impl Agent {
    pub fn builder(data_dir: impl Into<PathBuf>) -> AgentBuilder {
        AgentBuilder::new(data_dir)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Workflows, events and runs.
    pub fn workflows(&self) -> &Runtime {
        &self.workflows
    }

    /// Identity, peers, the outbox and receipt of other agents' deliveries.
    pub fn federation(&self) -> &Federation {
        &self.federation
    }

    /// The operator's policy in force (replaceable at run time).
    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }

    /// The hooks this agent declares and its tenants' bindings.
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// A declared extension point, to call.
    pub fn hook<'a>(&'a self, name: &'a str) -> Hook<'a> {
        Hook {
            hooks: &self.hooks,
            runtime: &self.workflows,
            name,
        }
    }

    /// Stops background work and commits what the journal holds. Runs still executing
    /// resume at the next start.
    pub async fn shutdown(&self) {
        if let Some(cluster) = self.cluster.get() {
            cluster.leave().await;
        }
        self.federation.shutdown().await;
        self.workflows.shutdown().await;
        if let Some(telemetry) = &self.telemetry {
            telemetry.shutdown().await;
        }
    }

    /// Recorded calls (tapes).
    pub fn tapes(&self) -> &crate::tapes::Tapes {
        &self.tapes
    }

    /// Joins a cluster on NATS JetStream (`cluster.rs`): from then on events posted here
    /// go to the cluster's stream, and this agent journals its share of them.
    pub async fn join_cluster(
        self: &Arc<Self>,
        config: &ClusterConfig,
    ) -> Result<(), ClusterError> {
        if self.cluster.get().is_some() {
            return Err(ClusterError::Joined);
        }
        // A JetStream cluster elects its leaders after it starts: until then it refuses
        // streams, so setting up is tried again for a while.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let cluster = loop {
            match Cluster::join(config, self).await {
                Ok(cluster) => break cluster,
                Err(ClusterError::Setup(reason)) if tokio::time::Instant::now() < deadline => {
                    tracing::info!("the cluster is not ready ({reason}); trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error),
            }
        };
        self.cluster.set(cluster).map_err(|_| ClusterError::Joined)
    }

    /// A setting changed through this agent's API: in a cluster, the others get it
    /// (answers once the cluster holds it).
    pub async fn changed(&self, setting: crate::cluster::Setting) {
        if let Some(cluster) = self.cluster.get() {
            cluster.changed(setting).await;
        }
    }

    /// The cluster this agent serves in, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Which version serves each module name, and rollouts.
    pub fn releases(&self) -> &Arc<Releases> {
        &self.releases
    }

    /// What the tenant's workflows and hook bindings that call `name` by its bare name
    /// need of the version that serves it.
    pub async fn name_uses(&self, tenant: &str, name: &str) -> Result<Vec<NameUse>, ReleaseError> {
        let mut uses = self
            .workflows
            .name_uses(tenant, name)
            .await
            .map_err(|e| ReleaseError::Lookup(e.to_string()))?;
        uses.extend(
            self.hooks
                .name_uses(tenant, name)
                .await
                .map_err(|e| ReleaseError::Lookup(e.to_string()))?,
        );
        Ok(uses)
    }

    /// The OpenTelemetry exporter, when the agent exports spans.
    pub fn telemetry(&self) -> Option<&Telemetry> {
        self.telemetry.as_ref()
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Who may use the Deadlift v1 routes.
    pub fn v1_access(&self) -> V1Access {
        self.v1_access
    }

    pub fn default_grant(&self) -> &Grant {
        &self.default_grant
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_secrets_score_below_the_minimum_and_random_ones_above() {
        for weak in [
            "x",
            "admin",
            "test-admin-token",
            &"a".repeat(64),
            "password1234567890",
        ] {
            assert!(estimated_bits(weak) < MIN_TOKEN_BITS, "{weak}");
        }
        assert!(estimated_bits(&new_token().unwrap()) >= MIN_TOKEN_BITS);
        assert!(estimated_bits("Zq3xV9pL2mR7tK4wY8nB6cH1jF5gD0sA") >= MIN_TOKEN_BITS);
    }
}
