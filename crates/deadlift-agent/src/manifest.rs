//! Module manifests: the Extism manifest options a tenant stores with one of its
//! modules (config, allowed hosts, WASI, memory in the SDK's `max_pages`, timeout, fuel,
//! and the host functions it needs), so that a direct call of the module over the API
//! runs with them instead of the agent-wide default grant. A manifest is a grant the
//! tenant writes: it is checked against the operator's policy when stored and clamped
//! to the policy in force at each call. The SQL of the `module_manifests` table lives
//! here too.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::agent::Agent;
use crate::clock::now_ms;
use crate::policy::Excess;
use crate::store::DbError;
use deadlift_engine::{Code, Grant, ModuleError, ModuleId};

/// Bytes in one Wasm page: what the SDK's `max_pages` counts.
const PAGE_BYTES: u64 = 64 * 1024;

/// Memory limits as the SDK's manifest writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryManifest {
    /// Most pages (64 KiB each) the module's memory may have.
    pub max_pages: u32,
}

/// The options a tenant stores with a module.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Values the module reads with `config_get`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Hosts `http_request` may reach (globs over names; addresses exactly).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    #[serde(default)]
    pub wasi: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryManifest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Host functions the module is granted (e.g. `kv_get`, `emit`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub host_functions: BTreeSet<String>,
}

impl Manifest {
    /// The grant a direct call runs with: `base` (the agent's default grant) with this
    /// manifest's options.
    pub fn grant(&self, base: &Grant) -> Grant {
        let mut grant = base.clone();
        grant.config.clone_from(&self.config);
        grant.allowed_hosts.clone_from(&self.allowed_hosts);
        grant.wasi = self.wasi;
        grant.host_functions.clone_from(&self.host_functions);
        if let Some(memory) = &self.memory {
            grant.memory_bytes = u64::from(memory.max_pages) * PAGE_BYTES;
        }
        if let Some(ms) = self.timeout_ms {
            grant.timeout = Duration::from_millis(ms);
        }
        if let Some(fuel) = self.fuel {
            grant.fuel = Some(fuel);
        }
        grant
    }
}

/// Why a manifest was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error("the manifest asks for more than the operator allows this tenant")]
    OverPolicy(Vec<Excess>),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl ManifestError {
    pub fn code(&self) -> Code {
        match self {
            Self::Module(error) => error.code(),
            Self::OverPolicy(_) => Code::GrantOverPolicy,
            Self::Db(error) => error.code(),
        }
    }
}

impl From<tokio::task::JoinError> for ManifestError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Db(DbError::from(e))
    }
}

impl Agent {
    /// Stores `manifest` with the tenant's module `reference`, after checking what it
    /// asks for against the operator's policy (the agent's own default grant, which the
    /// operator chose, is not the tenant's to answer for).
    pub async fn set_manifest(
        &self,
        tenant: &str,
        reference: &str,
        manifest: Manifest,
    ) -> Result<ModuleId, ManifestError> {
        let excess = self
            .policy()
            .current()
            .check(tenant, &manifest.grant(&Grant::default()));
        if !excess.is_empty() {
            return Err(ManifestError::OverPolicy(excess));
        }
        let (engine, db) = (self.engine().clone(), self.db().clone());
        let (tenant, reference) = (tenant.to_owned(), reference.to_owned());
        tokio::task::spawn_blocking(move || {
            let module = engine.registry().resolve(&tenant, &reference)?;
            upsert(
                &db.lock(),
                &tenant,
                &module.id.to_string(),
                &manifest,
                now_ms(),
            )?;
            db.manifests().forget(&tenant, &module.id);
            Ok(module.id)
        })
        .await?
    }

    /// The manifest stored with a tenant's module, if any; from memory once read (every
    /// direct call asks).
    pub async fn manifest(
        &self,
        tenant: &str,
        module: &ModuleId,
    ) -> Result<Option<Manifest>, ManifestError> {
        let cache = self.db().manifests();
        if let Some(known) = cache.get(tenant, module) {
            return Ok(known);
        }
        let generation = cache.generation();
        let (db, owner, id) = (self.db().clone(), tenant.to_owned(), module.to_string());
        let read = tokio::task::spawn_blocking(move || get(&db.read(), &owner, &id)).await??;
        cache.put(tenant, module, read.clone(), generation);
        Ok(read)
    }

    /// The grant a direct call of a tenant's module runs with: its manifest's (held to
    /// the policy in force now) or, without one, the agent's default grant.
    pub async fn call_grant(
        &self,
        tenant: &str,
        module: &ModuleId,
    ) -> Result<Grant, ManifestError> {
        Ok(match self.manifest(tenant, module).await? {
            Some(manifest) => {
                let grant = manifest.grant(self.default_grant());
                self.policy().current().clamp(tenant, &grant).0
            }
            None => self.default_grant().clone(),
        })
    }
}

/// Stores (or replaces) the manifest of a tenant's module.
pub(crate) fn upsert(
    conn: &Connection,
    tenant: &str,
    module: &str,
    manifest: &Manifest,
    now: i64,
) -> Result<(), DbError> {
    let text = serde_json::to_string(manifest).map_err(|e| DbError::Corrupt(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO module_manifests (tenant, module_id, manifest, updated_unix_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant, module_id) DO UPDATE SET manifest = excluded.manifest,
            updated_unix_ms = excluded.updated_unix_ms",
    )?
    .execute(params![tenant, module, text, now])?;
    Ok(())
}

/// The manifest of a tenant's module, if it has one.
pub(crate) fn get(
    conn: &Connection,
    tenant: &str,
    module: &str,
) -> Result<Option<Manifest>, DbError> {
    let text: Option<String> = conn
        .prepare_cached(
            "SELECT manifest FROM module_manifests WHERE tenant = ?1 AND module_id = ?2",
        )?
        .query_row(params![tenant, module], |row| row.get(0))
        .optional()?;
    text.map(|text| serde_json::from_str(&text).map_err(|e| DbError::Corrupt(e.to_string())))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_began_before_a_change_is_not_kept() {
        let cache = ManifestCache::default();
        let module = ModuleId::of(b"m");
        let old: Manifest = serde_json::from_str(r#"{"timeout_ms": 1}"#).unwrap();
        let before = cache.generation();
        cache.forget("acme", &module);
        cache.put("acme", &module, Some(old.clone()), before);
        assert_eq!(cache.get("acme", &module), None, "a stale read was kept");
        cache.put("acme", &module, Some(old.clone()), cache.generation());
        assert_eq!(cache.get("acme", &module), Some(Some(old)));
        cache.forget("acme", &module);
        assert_eq!(cache.get("acme", &module), None);
    }

    #[test]
    fn a_manifest_reads_as_the_sdk_writes_it_and_becomes_a_grant() {
        let manifest: Manifest = serde_json::from_str(
            r#"{"config": {"greeting": "Hi"}, "allowed_hosts": ["api.example.com"],
                "memory": {"max_pages": 17}, "timeout_ms": 250, "fuel": 1000}"#,
        )
        .unwrap();
        let grant = manifest.grant(&Grant::default());
        assert_eq!(grant.config["greeting"], "Hi");
        assert_eq!(grant.memory_bytes, 17 * 64 * 1024);
        assert_eq!(grant.timeout, Duration::from_millis(250));
        assert_eq!(grant.fuel, Some(1000));
        assert!(serde_json::from_str::<Manifest>(r#"{"wasm": []}"#).is_err());
    }
}

/// Manifests read from the database, kept in memory. A change forgets the entry and
/// moves the generation on, so that a read that began before it is not kept.
#[derive(Debug, Default)]
pub struct ManifestCache {
    entries: parking_lot::Mutex<std::collections::HashMap<(String, ModuleId), Option<Manifest>>>,
    generation: std::sync::atomic::AtomicU64,
}

/// Entries kept before the cache starts again.
const CACHED_MANIFESTS: usize = 65_536;

impl ManifestCache {
    fn get(&self, tenant: &str, module: &ModuleId) -> Option<Option<Manifest>> {
        self.entries
            .lock()
            .get(&(tenant.to_owned(), *module))
            .cloned()
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn put(&self, tenant: &str, module: &ModuleId, manifest: Option<Manifest>, read_at: u64) {
        let mut entries = self.entries.lock();
        if self.generation() != read_at {
            return;
        }
        if entries.len() >= CACHED_MANIFESTS {
            entries.clear();
        }
        entries.insert((tenant.to_owned(), *module), manifest);
    }

    /// The manifest of `module` changed or went.
    pub(crate) fn forget(&self, tenant: &str, module: &ModuleId) {
        let mut entries = self.entries.lock();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.remove(&(tenant.to_owned(), *module));
    }
}
