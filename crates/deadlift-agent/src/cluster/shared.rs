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
use deadlift_engine::registry::{ModuleId, NewModule};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

use super::ClusterError;
use crate::Agent;
use crate::workflow::{WorkflowError, WorkflowSpec};

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

/// A setting changed through this agent's API (or found here when it joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    Tenant(String),
    /// A tenant token, by id.
    Token(String),
    Module {
        tenant: String,
        id: ModuleId,
    },
    Manifest {
        tenant: String,
        id: ModuleId,
    },
    Workflow {
        tenant: String,
        name: String,
    },
    /// A module name's release: its live version and rollout.
    Release {
        tenant: String,
        name: String,
    },
    /// A tenant's binding to a hook (the hook must be declared on every agent).
    Binding {
        tenant: String,
        hook: String,
    },
}

impl Setting {
    fn key(&self) -> String {
        match self {
            Self::Tenant(tenant) => format!("tenants.{tenant}"),
            Self::Token(id) => format!("tokens.{id}"),
            Self::Module { tenant, id } => format!("modules.{tenant}.{}", id.hex()),
            Self::Manifest { tenant, id } => format!("manifests.{tenant}.{}", id.hex()),
            Self::Workflow { tenant, name } => format!("workflows.{tenant}.{name}"),
            Self::Release { tenant, name } => format!("releases.{tenant}.{name}"),
            Self::Binding { tenant, hook } => format!("bindings.{tenant}.{hook}"),
        }
    }

    fn from_key(key: &str) -> Option<Self> {
        let (kind, rest) = key.split_once('.')?;
        let tenant_and = |rest: &str| -> Option<(String, String)> {
            let (tenant, rest) = rest.split_once('.')?;
            deadlift_engine::names::tenant_name(tenant).ok()?;
            Some((tenant.to_owned(), rest.to_owned()))
        };
        match kind {
            "tenants" => {
                deadlift_engine::names::tenant_name(rest).ok()?;
                Some(Self::Tenant(rest.to_owned()))
            }
            "tokens" => Some(Self::Token(rest.to_owned())),
            "modules" => {
                let (tenant, hex) = tenant_and(rest)?;
                Some(Self::Module {
                    tenant,
                    id: hex.parse().ok()?,
                })
            }
            "manifests" => {
                let (tenant, hex) = tenant_and(rest)?;
                Some(Self::Manifest {
                    tenant,
                    id: hex.parse().ok()?,
                })
            }
            "workflows" => {
                let (tenant, name) = tenant_and(rest)?;
                Some(Self::Workflow { tenant, name })
            }
            "releases" => {
                let (tenant, name) = tenant_and(rest)?;
                Some(Self::Release { tenant, name })
            }
            "bindings" => {
                let (tenant, hook) = tenant_and(rest)?;
                Some(Self::Binding { tenant, hook })
            }
            _ => None,
        }
    }
}

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

/// What this agent holds that the cluster shares, to name to the publisher when it
/// joins.
pub(crate) async fn local_settings(agent: &Agent) -> Result<Vec<Setting>, ClusterError> {
    let lookup =
        |e: &dyn std::fmt::Display| ClusterError::Setup(format!("reading the local settings: {e}"));
    let db = agent.db().clone();
    let engine = agent.engine().clone();
    let (tenants, tokens, modules) = tokio::task::spawn_blocking(move || {
        let tenants = db.tenants()?;
        let tokens = db.tokens(None)?;
        let mut modules = Vec::new();
        for tenant in &tenants {
            for info in engine
                .registry()
                .list(tenant)
                .map_err(|e| crate::store::DbError::Corrupt(e.to_string()))?
            {
                modules.push((tenant.clone(), info.id));
            }
        }
        Ok::<_, crate::store::DbError>((tenants, tokens, modules))
    })
    .await
    .map_err(|e| lookup(&e))?
    .map_err(|e| lookup(&e))?;
    let mut seed: Vec<Setting> = tenants.iter().cloned().map(Setting::Tenant).collect();
    for (tenant, id) in modules {
        seed.push(Setting::Module {
            tenant: tenant.clone(),
            id,
        });
        seed.push(Setting::Manifest { tenant, id });
    }
    for tenant in &tenants {
        for workflow in agent
            .workflows()
            .workflows(tenant)
            .await
            .map_err(|e| lookup(&e))?
        {
            seed.push(Setting::Workflow {
                tenant: tenant.clone(),
                name: workflow.name,
            });
        }
    }
    for tenant in &tenants {
        for name in agent.db().releases().names(tenant) {
            seed.push(Setting::Release {
                tenant: tenant.clone(),
                name,
            });
        }
        for hook in agent.hooks().list(tenant).await.map_err(|e| lookup(&e))? {
            if hook.binding.is_some() {
                seed.push(Setting::Binding {
                    tenant: tenant.clone(),
                    hook: hook.name,
                });
            }
        }
    }
    seed.extend(
        tokens
            .into_iter()
            .filter(|token| !token.admin)
            .map(|token| Setting::Token(token.id)),
    );
    Ok(seed)
}

/// The setting's value here, as the bucket holds it; `None` when it is not here.
async fn local(agent: &Agent, setting: &Setting) -> Result<Option<Value>, String> {
    match setting {
        Setting::Tenant(tenant) => {
            let (db, tenant) = (agent.db().clone(), tenant.clone());
            let exists = tokio::task::spawn_blocking(move || db.tenant_exists(&tenant))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok(exists.then(|| json!({})))
        }
        Setting::Token(id) => {
            let (db, id) = (agent.db().clone(), id.clone());
            let record = tokio::task::spawn_blocking(move || db.token_record(&id))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok(record
                .filter(|record| record.tenant.is_some())
                .map(|record| json!(record)))
        }
        Setting::Module { tenant, id } => {
            let (engine, tenant, id) = (agent.engine().clone(), tenant.clone(), *id);
            let info = tokio::task::spawn_blocking(move || engine.registry().get(&tenant, &id))
                .await
                .map_err(|e| e.to_string())?;
            Ok(info.ok().map(|info| {
                json!({
                    "name": info.name,
                    "version": info.version,
                    "title": info.title,
                    "description": info.description,
                })
            }))
        }
        Setting::Manifest { tenant, id } => Ok(agent
            .manifest(tenant, id)
            .await
            .map_err(|e| e.to_string())?
            .map(|manifest| json!(manifest))),
        Setting::Workflow { tenant, name } => {
            match agent.workflows().workflow(tenant, name).await {
                Ok(version) => Ok(Some(shared_spec(version.spec))),
                Err(WorkflowError::NotFound(_)) => Ok(None),
                Err(error) => Err(error.to_string()),
            }
        }
        Setting::Release { tenant, name } => Ok(agent
            .db()
            .releases()
            .get(tenant, name)
            .map(|release| json!(*release))),
        Setting::Binding { tenant, hook } => Ok(agent
            .hooks()
            .binding(tenant, hook)
            .await
            .map_err(|e| e.to_string())?
            .map(|binding| json!({"module": binding.module, "function": binding.function}))),
    }
}

/// A workflow document as shared: what the agent pins at apply is left out, since each
/// agent pins it again.
fn shared_spec(mut spec: WorkflowSpec) -> Value {
    for step in &mut spec.steps {
        step.pinned = None;
    }
    json!(spec)
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

/// Makes the local setting under `key` what the cluster holds (`None`: deleted).
async fn apply(
    agent: &Agent,
    modules: &object_store::ObjectStore,
    key: &str,
    there: Option<Value>,
) -> Result<(), String> {
    let Some(setting) = Setting::from_key(key) else {
        return Ok(());
    };
    let here = local(agent, &setting).await?;
    if here == there {
        return Ok(());
    }
    match (setting, there) {
        (Setting::Tenant(tenant), Some(_)) => {
            let db = agent.db().clone();
            tokio::task::spawn_blocking(move || db.create_tenant(&tenant))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        // Tenants are never deleted.
        (Setting::Tenant(_), None) => {}
        (Setting::Token(_), Some(value)) => {
            let record: crate::store::TokenRecord =
                serde_json::from_value(value).map_err(|e| e.to_string())?;
            let db = agent.db().clone();
            tokio::task::spawn_blocking(move || db.put_token_record(&record))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        (Setting::Token(id), None) => {
            let db = agent.db().clone();
            tokio::task::spawn_blocking(move || db.revoke_token(&id))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        (Setting::Module { tenant, id }, Some(value)) => {
            // The metadata is immutable: a module here under this id is the one.
            if here.is_some() {
                return Ok(());
            }
            let mut object = modules.get(id.hex()).await.map_err(|e| e.to_string())?;
            let mut bytes = Vec::new();
            object
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| e.to_string())?;
            if ModuleId::of(&bytes) != id {
                return Err(format!("the cluster's bytes of {id} are not that module"));
            }
            let text = |field: &str| value[field].as_str().map(str::to_owned);
            let module = NewModule {
                name: text("name").unwrap_or_default(),
                version: text("version"),
                title: text("title"),
                description: text("description"),
                bytes,
            };
            let engine = agent.engine().clone();
            tokio::task::spawn_blocking(move || engine.add_module(&tenant, module))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        (Setting::Module { tenant, id }, None) => {
            let engine = agent.engine().clone();
            let _ = tokio::task::spawn_blocking(move || engine.delete_module(&tenant, &id))
                .await
                .map_err(|e| e.to_string())?;
        }
        (Setting::Manifest { tenant, id }, Some(value)) => {
            let manifest: crate::manifest::Manifest =
                serde_json::from_value(value).map_err(|e| e.to_string())?;
            agent
                .set_manifest(&tenant, &id.to_string(), manifest)
                .await
                .map_err(|e| e.to_string())?;
        }
        // A manifest goes with its module.
        (Setting::Manifest { .. }, None) => {}
        (Setting::Workflow { tenant, name }, Some(value)) => {
            let spec: WorkflowSpec = serde_json::from_value(value).map_err(|e| e.to_string())?;
            agent
                .workflows()
                .apply(&tenant, spec, Some(&name))
                .await
                .map_err(|e| e.to_string())?;
        }
        (Setting::Release { tenant, name }, there) => {
            let release: Option<crate::releases::Release> = there
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| e.to_string())?;
            agent
                .releases()
                .replicate(&tenant, &name, release)
                .await
                .map_err(|e| e.to_string())?;
        }
        (Setting::Binding { tenant, hook }, Some(value)) => {
            let text = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
            let binding = crate::hooks::Binding {
                hook,
                module: text("module"),
                function: text("function"),
                pinned: None,
                updated_unix_ms: 0,
            };
            agent
                .hooks()
                .bind(&tenant, binding)
                .await
                .map_err(|e| e.to_string())?;
        }
        (Setting::Binding { tenant, hook }, None) => {
            match agent.hooks().unbind(&tenant, &hook).await {
                Ok(()) | Err(crate::hooks::HookError::NotBound { .. }) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        (Setting::Workflow { tenant, name }, None) => {
            match agent.workflows().delete(&tenant, &name).await {
                Ok(()) | Err(WorkflowError::NotFound(_)) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_is_found_again_from_its_key() {
        let id = ModuleId::of(b"m");
        for setting in [
            Setting::Tenant("acme".into()),
            Setting::Token("0a1b2c3d4e5f".into()),
            Setting::Module {
                tenant: "acme".into(),
                id,
            },
            Setting::Manifest {
                tenant: "acme".into(),
                id,
            },
            Setting::Workflow {
                tenant: "acme".into(),
                name: "orders.v2".into(),
            },
        ] {
            assert_eq!(Setting::from_key(&setting.key()), Some(setting));
        }
        assert_eq!(Setting::from_key("tenants.Bad"), None);
        assert_eq!(Setting::from_key("modules.acme.nothex"), None);
        assert_eq!(Setting::from_key("other.x"), None);
    }
}
