//! The agent's durable state in one SQLite file: tenants, API tokens (hashed), module
//! metadata and bytes, and key-value entries (the workflow journal's tables live here
//! too; their SQL is in `workflow::journal`). It implements the library's storage
//! traits ([`ModuleStore`], and `KvStore` in `kv.rs`) so the engine persists without
//! knowing SQL.
//!
//! Migrations are embedded and applied in order at open; every connection runs in WAL
//! mode with foreign keys on. All calls block: async code reaches them through
//! `spawn_blocking` (the server does), engine workers call them directly.

mod kv;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use crate::clock::now_ms;
use crate::releases::ReleaseTable;
use crate::schema::MIGRATIONS;
use deadlift_engine::Code;

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use deadlift_engine::host::KvError;
use deadlift_engine::registry::{ModuleId, ModuleInfo, ModuleStore, StoreError};

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database holds schema version {found}, newer than this agent understands ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the journal could not commit: {0}")]
    Commit(String),
    /// A blocking database task panicked or was cancelled.
    #[error("a database task failed: {0}")]
    Task(String),
    #[error("cannot start the journal writer: {0}")]
    Start(std::io::Error),
    #[error("cannot make the database files private: {0}")]
    Files(String),
    #[error("the agent is shutting down")]
    Closed,
}

impl DbError {
    pub fn code(&self) -> Code {
        match self {
            Self::Closed => Code::ShuttingDown,
            _ => Code::Internal,
        }
    }
}

impl From<tokio::task::JoinError> for DbError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Task(e.to_string())
    }
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        StoreError(e.to_string())
    }
}

impl From<DbError> for KvError {
    fn from(e: DbError) -> Self {
        KvError::Storage(e.to_string())
    }
}

/// Makes the database file, and its -wal and -shm files where they exist, readable and
/// writable by the owner only (creating an empty database file if there is none).
#[cfg(unix)]
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn owner_only(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// What a committed write survives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Every commit is flushed to disk (`fsync`) before it is acknowledged: it survives
    /// a power loss. The journal's group commit keeps this affordable.
    #[default]
    PowerLoss,
    /// Commits reach the operating system but are flushed only at checkpoints: they
    /// survive the agent's process being killed, not the machine losing power.
    ProcessCrash,
}

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Tenant(String),
}

/// A token as listed (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub tenant: Option<String>,
    pub admin: bool,
    pub description: Option<String>,
    pub created_unix_ms: i64,
}

/// A token as stored (its hash, never its secret): what a cluster's agents share.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// The SHA-256 of the secret, hex.
    pub hash: String,
    pub tenant: Option<String>,
    pub admin: bool,
    pub description: Option<String>,
    pub created_unix_ms: i64,
}

/// The agent's database. Cheap to clone; one connection serialised behind a mutex,
/// which SQLite in WAL mode serves well for an agent's write rate.
#[derive(Debug, Clone)]
pub struct Database {
    conn: Arc<Mutex<Connection>>,
    /// Reads of committed state (the workflow journal's queries); the same connection as
    /// `conn` for an in-memory database.
    reader: Arc<Mutex<Connection>>,
    /// Tokens and tenants known to exist, so that authenticating a request needs no
    /// query. Tokens leave it when revoked; tenants are never deleted.
    known: Arc<Mutex<Known>>,
    /// What each module name stands for (`releases.rs`), kept in memory.
    releases: Arc<ReleaseTable>,
    /// Module manifests read once (`manifest.rs`).
    manifests: Arc<crate::manifest::ManifestCache>,
    /// In a cluster, plug-in KV lives there, and this file's `kv` table is left as it was.
    shared_kv: Arc<kv::SharedKv>,
}

#[derive(Debug, Default)]
struct Known {
    tokens: std::collections::HashMap<Vec<u8>, Principal>,
    tenants: std::collections::HashSet<String>,
}

impl Database {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Self::open_with(path, Durability::PowerLoss)
    }

    /// Opens the database with the given durability of commits.
    pub fn open_with(path: &Path, durability: Durability) -> Result<Self, DbError> {
        // Owner-only: SQLite gives its -wal and -shm files the database file's mode.
        owner_only(path).map_err(|e| DbError::Files(format!("{}: {e}", path.display())))?;
        let conn = Connection::open(path)?;
        let mut db = Self::prepare(conn, durability)?;
        // A second connection for reads: in WAL mode it reads the last commit without
        // waiting for a writer that is committing (and fsyncing).
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        reader.pragma_update(None, "cache_size", -16 * 1024)?;
        db.reader = Arc::new(Mutex::new(reader));
        Ok(db)
    }

    /// Replaces every admin token with `secret` (stored hashed; kept if it is one
    /// already): an operator who gives a new admin token at start revokes the old one.
    pub fn replace_admin_tokens(&self, secret: &str, description: &str) -> Result<(), DbError> {
        let hash = Sha256::digest(secret.as_bytes()).to_vec();
        let removed = self
            .conn()
            .execute("DELETE FROM tokens WHERE admin = 1 AND hash != ?1", [&hash])?;
        if removed > 0 {
            self.known()
                .tokens
                .retain(|known, principal| *known == hash || *principal != Principal::Admin);
        }
        if self.authenticate(secret)? != Some(Principal::Admin) {
            self.add_token(secret, &Principal::Admin, Some(description))?;
        }
        Ok(())
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, DbError> {
        Self::prepare(Connection::open_in_memory()?, Durability::ProcessCrash)
    }

    fn prepare(mut conn: Connection, durability: Durability) -> Result<Self, DbError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let synchronous = match durability {
            Durability::PowerLoss => "FULL",
            Durability::ProcessCrash => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        // Journal reads and writes touch the same hot pages over and over; keep more of
        // them in memory than SQLite's default 2 MiB.
        conn.pragma_update(None, "cache_size", -32 * 1024)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(DbError::TooNew {
                found: version,
                known,
            });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", index as i64 + 1)?;
            tx.commit()?;
        }
        let releases = Arc::new(ReleaseTable::load(&conn)?);
        let conn = Arc::new(Mutex::new(conn));
        Ok(Self {
            reader: conn.clone(),
            conn,
            known: Arc::default(),
            releases,
            manifests: Arc::default(),
            shared_kv: Arc::default(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    /// The connection, for the workflow journal's own SQL.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn()
    }

    /// What each module name stands for.
    pub fn releases(&self) -> &ReleaseTable {
        &self.releases
    }

    /// Module manifests read once.
    pub fn manifests(&self) -> &crate::manifest::ManifestCache {
        &self.manifests
    }

    /// A read-only connection to committed state, which a commit in progress does not
    /// block.
    pub(crate) fn read(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock()
    }

    pub fn schema_version(&self) -> Result<i64, DbError> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |row| row.get(0))?)
    }

    /// Creates a tenant; `false` if it already existed.
    pub fn create_tenant(&self, name: &str) -> Result<bool, DbError> {
        let changed = self.conn().execute(
            "INSERT OR IGNORE INTO tenants (name, created_unix_ms) VALUES (?1, ?2)",
            params![name, now_ms()],
        )?;
        Ok(changed == 1)
    }

    pub fn tenant_exists(&self, name: &str) -> Result<bool, DbError> {
        if self.known().tenants.contains(name) {
            return Ok(true);
        }
        let exists = self
            .conn()
            .query_row("SELECT 1 FROM tenants WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some();
        if exists {
            self.known().tenants.insert(name.to_owned());
        }
        Ok(exists)
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock()
    }

    /// Who the secret belongs to, when that is already known without a query; `None`
    /// means "ask [`authenticate`](Self::authenticate)", not "unknown token".
    pub fn cached_principal(&self, secret: &str) -> Option<Principal> {
        let hash = Sha256::digest(secret.as_bytes()).to_vec();
        self.known().tokens.get(&hash).cloned()
    }

    /// Whether the tenant is known to exist without a query.
    pub fn cached_tenant(&self, name: &str) -> bool {
        self.known().tenants.contains(name)
    }

    pub fn tenants(&self) -> Result<Vec<String>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name FROM tenants ORDER BY name")?;
        let names = stmt
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(names)
    }

    /// Stores a token by the SHA-256 of its secret.
    pub fn add_token(
        &self,
        secret: &str,
        principal: &Principal,
        description: Option<&str>,
    ) -> Result<TokenInfo, DbError> {
        let hash = Sha256::digest(secret.as_bytes()).to_vec();
        let id = hex::encode(&hash[..6]);
        let (tenant, admin) = match principal {
            Principal::Admin => (None, true),
            Principal::Tenant(t) => (Some(t.clone()), false),
        };
        let created = now_ms();
        self.conn().execute(
            "INSERT INTO tokens (id, hash, tenant, admin, description, created_unix_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, hash, tenant, admin, description, created],
        )?;
        Ok(TokenInfo {
            id,
            tenant,
            admin,
            description: description.map(str::to_owned),
            created_unix_ms: created,
        })
    }

    /// Who the secret belongs to, if it is a known token.
    pub fn authenticate(&self, secret: &str) -> Result<Option<Principal>, DbError> {
        let hash = Sha256::digest(secret.as_bytes()).to_vec();
        if let Some(principal) = self.known().tokens.get(&hash) {
            return Ok(Some(principal.clone()));
        }
        let row: Option<(Option<String>, bool)> = self
            .conn()
            .query_row(
                "SELECT tenant, admin FROM tokens WHERE hash = ?1",
                [&hash],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let principal = row.map(|(tenant, admin)| match (admin, tenant) {
            (true, _) | (false, None) => Principal::Admin,
            (false, Some(tenant)) => Principal::Tenant(tenant),
        });
        if let Some(principal) = &principal {
            self.known().tokens.insert(hash, principal.clone());
        }
        Ok(principal)
    }

    pub fn has_admin_token(&self) -> Result<bool, DbError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM tokens WHERE admin = 1 LIMIT 1", [], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    pub fn tokens(&self, tenant: Option<&str>) -> Result<Vec<TokenInfo>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, tenant, admin, description, created_unix_ms FROM tokens
             WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_unix_ms, id",
        )?;
        let tokens = stmt
            .query_map([tenant], |row| {
                Ok(TokenInfo {
                    id: row.get(0)?,
                    tenant: row.get(1)?,
                    admin: row.get(2)?,
                    description: row.get(3)?,
                    created_unix_ms: row.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(tokens)
    }

    /// A token's stored record, if there is one.
    pub fn token_record(&self, id: &str) -> Result<Option<TokenRecord>, DbError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, hash, tenant, admin, description, created_unix_ms FROM tokens
                 WHERE id = ?1",
                [id],
                |row| {
                    Ok(TokenRecord {
                        id: row.get(0)?,
                        hash: hex::encode(row.get::<_, Vec<u8>>(1)?),
                        tenant: row.get(2)?,
                        admin: row.get(3)?,
                        description: row.get(4)?,
                        created_unix_ms: row.get(5)?,
                    })
                },
            )
            .optional()?)
    }

    /// Stores a tenant token made on another agent of the cluster (its tenant must be
    /// here). Admin tokens are each agent's own and are refused.
    pub fn put_token_record(&self, record: &TokenRecord) -> Result<(), DbError> {
        let hash = hex::decode(&record.hash)
            .ok()
            .filter(|hash| hash.len() == 32)
            .ok_or_else(|| DbError::Corrupt(format!("token {}: not a SHA-256", record.id)))?;
        let Some(tenant) = record.tenant.as_deref().filter(|_| !record.admin) else {
            return Err(DbError::Corrupt(format!(
                "token {}: an admin token is not shared",
                record.id
            )));
        };
        self.conn().execute(
            "INSERT INTO tokens (id, hash, tenant, admin, description, created_unix_ms)
             VALUES (?1, ?2, ?3, 0, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET description = excluded.description",
            params![
                record.id,
                hash,
                tenant,
                record.description,
                record.created_unix_ms
            ],
        )?;
        Ok(())
    }

    pub fn revoke_token(&self, id: &str) -> Result<bool, DbError> {
        let conn = self.conn();
        let hash: Option<Vec<u8>> = conn
            .query_row("SELECT hash FROM tokens WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()?;
        let revoked = conn.execute("DELETE FROM tokens WHERE id = ?1", [id])? == 1;
        if let Some(hash) = hash {
            self.known().tokens.remove(&hash);
        }
        Ok(revoked)
    }

    fn decode_info(text: &str) -> Result<ModuleInfo, DbError> {
        serde_json::from_str(text).map_err(|e| DbError::Corrupt(format!("module record: {e}")))
    }
}

impl ModuleStore for Database {
    fn insert(&self, info: &ModuleInfo, bytes: &[u8]) -> Result<(), StoreError> {
        let record = serde_json::to_string(info).map_err(|e| StoreError(e.to_string()))?;
        let id = info.id.to_string();
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(DbError::from)?;
        tx.execute(
            "INSERT OR IGNORE INTO tenants (name, created_unix_ms) VALUES (?1, ?2)",
            params![info.tenant, now_ms()],
        )
        .map_err(DbError::from)?;
        tx.execute(
            "INSERT OR IGNORE INTO module_blobs (id, bytes) VALUES (?1, ?2)",
            params![id, bytes],
        )
        .map_err(DbError::from)?;
        tx.execute(
            "INSERT INTO modules (tenant, id, info, name, version, created_unix_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                info.tenant,
                id,
                record,
                info.name,
                info.version.as_deref().unwrap_or(""),
                info.created_unix_ms as i64
            ],
        )
        .map_err(DbError::from)?;
        let released = crate::releases::on_insert(&tx, info)?;
        tx.commit().map_err(DbError::from)?;
        if let Some(release) = released {
            self.releases.put(&info.tenant, &info.name, Some(release));
        }
        Ok(())
    }

    fn get(&self, tenant: &str, id: &ModuleId) -> Result<Option<ModuleInfo>, StoreError> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT info FROM modules WHERE tenant = ?1 AND id = ?2",
                params![tenant, id.to_string()],
                |row| row.get(0),
            )
            .optional()
            .map_err(DbError::from)?;
        Ok(text.map(|t| Self::decode_info(&t)).transpose()?)
    }

    fn list(&self, tenant: &str) -> Result<Vec<ModuleInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT info FROM modules WHERE tenant = ?1 ORDER BY name, version")
            .map_err(DbError::from)?;
        let texts: Vec<String> = stmt
            .query_map([tenant], |row| row.get(0))
            .map_err(DbError::from)?
            .collect::<Result<_, _>>()
            .map_err(DbError::from)?;
        Ok(texts
            .iter()
            .map(|t| Self::decode_info(t))
            .collect::<Result<_, _>>()?)
    }

    fn named(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<ModuleInfo>, StoreError> {
        let text: Option<String> = self
            .read()
            .prepare_cached(
                "SELECT info FROM modules WHERE tenant = ?1 AND name = ?2 AND version = ?3",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![tenant, name, version.unwrap_or("")], |row| {
                    row.get(0)
                })
                .optional()
            })
            .map_err(DbError::from)?;
        Ok(text.map(|t| Self::decode_info(&t)).transpose()?)
    }

    fn newest(&self, tenant: &str, name: &str) -> Result<Option<ModuleInfo>, StoreError> {
        let text: Option<String> = self
            .read()
            .prepare_cached(
                "SELECT info FROM modules WHERE tenant = ?1 AND name = ?2
                 ORDER BY created_unix_ms DESC, rowid DESC LIMIT 1",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![tenant, name], |row| row.get(0))
                    .optional()
            })
            .map_err(DbError::from)?;
        Ok(text.map(|t| Self::decode_info(&t)).transpose()?)
    }

    fn current(&self, tenant: &str, name: &str) -> Result<Option<ModuleInfo>, StoreError> {
        match self.releases.get(tenant, name) {
            Some(release) => ModuleStore::get(self, tenant, &release.live.module),
            None => self.newest(tenant, name),
        }
    }

    fn bytes(&self, id: &ModuleId) -> Result<Option<Arc<[u8]>>, StoreError> {
        let bytes: Option<Vec<u8>> = self
            .conn()
            .query_row(
                "SELECT bytes FROM module_blobs WHERE id = ?1",
                [id.to_string()],
                |row| row.get(0),
            )
            .optional()
            .map_err(DbError::from)?;
        Ok(bytes.map(Arc::from))
    }

    fn delete(&self, tenant: &str, id: &ModuleId) -> Result<bool, StoreError> {
        let info = ModuleStore::get(self, tenant, id)?;
        let id = id.to_string();
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(DbError::from)?;
        let released = match &info {
            Some(info) => crate::releases::on_delete(&tx, &self.releases, info)?,
            None => None,
        };
        let removed = tx
            .execute(
                "DELETE FROM modules WHERE tenant = ?1 AND id = ?2",
                params![tenant, id],
            )
            .map_err(DbError::from)?;
        // The tenant's manifest goes with its module: a later upload of the same bytes
        // starts with no options rather than inheriting forgotten ones.
        tx.execute(
            "DELETE FROM module_manifests WHERE tenant = ?1 AND module_id = ?2",
            params![tenant, id],
        )
        .map_err(DbError::from)?;
        tx.execute(
            "DELETE FROM module_blobs WHERE id = ?1
             AND NOT EXISTS (SELECT 1 FROM modules WHERE id = ?1)",
            [&id],
        )
        .map_err(DbError::from)?;
        tx.commit().map_err(DbError::from)?;
        if let Ok(module) = id.parse::<ModuleId>() {
            self.manifests.forget(tenant, &module);
        }
        if let (Some(info), Some(release)) = (info, released) {
            self.releases.put(tenant, &info.name, release);
        }
        Ok(removed == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deadlift_engine::host::KvStore;
    use deadlift_engine::registry;

    fn module_info(tenant: &str, name: &str, bytes: &[u8]) -> ModuleInfo {
        ModuleInfo {
            id: ModuleId::of(bytes),
            tenant: tenant.into(),
            name: name.into(),
            title: None,
            version: None,
            description: None,
            size_bytes: bytes.len() as u64,
            exports: Vec::new(),
            imports: Vec::new(),
            created_unix_ms: 1,
        }
    }

    #[test]
    fn migrations_apply_once_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let db = Database::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        db.create_tenant("acme").unwrap();
        drop(db);
        let db = Database::open(&path).unwrap();
        assert_eq!(db.tenants().unwrap(), vec!["acme".to_owned()]);
    }

    #[test]
    fn tokens_are_stored_hashed_and_authenticate() {
        let db = Database::in_memory().unwrap();
        db.create_tenant("acme").unwrap();
        let info = db
            .add_token("secret-1", &Principal::Tenant("acme".into()), Some("ci"))
            .unwrap();
        assert_eq!(
            db.authenticate("secret-1").unwrap(),
            Some(Principal::Tenant("acme".into()))
        );
        assert_eq!(db.authenticate("secret-2").unwrap(), None);
        let stored: Vec<u8> = db
            .conn()
            .query_row("SELECT hash FROM tokens", [], |r| r.get(0))
            .unwrap();
        assert_ne!(stored, b"secret-1");
        assert!(db.revoke_token(&info.id).unwrap());
        assert_eq!(db.authenticate("secret-1").unwrap(), None);
    }

    #[test]
    fn module_bytes_are_shared_and_removed_with_the_last_record() {
        let db = Database::in_memory().unwrap();
        let bytes = b"\0asm\x01\0\0\0";
        let a = module_info("a", "m", bytes);
        let b = module_info("b", "m", bytes);
        ModuleStore::insert(&db, &a, bytes).unwrap();
        ModuleStore::insert(&db, &b, bytes).unwrap();
        assert_eq!(ModuleStore::list(&db, "a").unwrap(), vec![a.clone()]);
        assert!(ModuleStore::delete(&db, "a", &a.id).unwrap());
        assert!(ModuleStore::bytes(&db, &a.id).unwrap().is_some());
        assert!(ModuleStore::delete(&db, "b", &b.id).unwrap());
        assert!(ModuleStore::bytes(&db, &a.id).unwrap().is_none());
        assert!(registry::inspect(bytes).is_ok());
    }

    /// Issue 11: v1 routes moved from tenant `default` to `v1`; a database from before
    /// must not lose what its v1 clients made, nor hand `default`'s other workflows
    /// to the v1 tenant.
    #[test]
    fn a_database_from_before_the_v1_tenant_keeps_its_v1_view() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let before_split = MIGRATIONS
            .iter()
            .position(|m| m.contains("v1_split"))
            .unwrap();
        {
            let conn = Connection::open(&path).unwrap();
            for migration in &MIGRATIONS[..before_split] {
                conn.execute_batch(migration).unwrap();
            }
            conn.pragma_update(None, "user_version", before_split as i64)
                .unwrap();
            let bytes = b"\0asm\x01\0\0\0";
            let info = module_info("default", "adder", bytes);
            conn.execute_batch(&format!(
                "INSERT INTO tenants VALUES ('default', 1);
                 INSERT INTO module_blobs VALUES ('{id}', x'0061736d01000000');
                 INSERT INTO modules VALUES ('default', '{id}', '{info}', 'adder', '', 1);
                 INSERT INTO v1_workflows (tenant, workflow) VALUES ('default', 'v1-workflow-1');
                 INSERT INTO workflow_versions VALUES ('default', 'v1-workflow-1', 1, '{{}}', 1);
                 INSERT INTO workflows VALUES ('default', 'v1-workflow-1', 1, 1);
                 INSERT INTO workflow_versions VALUES ('default', 'orders', 1, '{{}}', 1);
                 INSERT INTO workflows VALUES ('default', 'orders', 1, 1);",
                id = info.id,
                info = serde_json::to_string(&info).unwrap(),
            ))
            .unwrap();
        }
        let db = Database::open(&path).unwrap();
        let v1 = ModuleStore::list(&db, "v1").unwrap();
        assert_eq!(v1.len(), 1);
        assert_eq!(
            (v1[0].tenant.as_str(), v1[0].name.as_str()),
            ("v1", "adder")
        );
        assert_eq!(ModuleStore::list(&db, "default").unwrap().len(), 1);
        let owners: Vec<(String, String)> = db
            .conn()
            .prepare("SELECT tenant, name FROM workflows ORDER BY name")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            owners,
            [
                ("default".to_owned(), "orders".to_owned()),
                ("v1".to_owned(), "v1-workflow-1".to_owned())
            ]
        );
        let v1_tenant: String = db
            .conn()
            .query_row("SELECT tenant FROM v1_workflows", [], |row| row.get(0))
            .unwrap();
        assert_eq!(v1_tenant, "v1");
        drop(db);
        // Opening again changes nothing more.
        let db = Database::open(&path).unwrap();
        assert_eq!(ModuleStore::list(&db, "v1").unwrap().len(), 1);
    }

    /// Issue 12: a call by name listed (and decoded) every module of the tenant; names
    /// are now looked up by the index, with the same answers.
    #[test]
    fn names_resolve_through_the_index_as_the_list_would() {
        let db = Database::in_memory().unwrap();
        db.create_tenant("a").unwrap();
        for (n, version) in [None, Some("1"), Some("2")].into_iter().enumerate() {
            let bytes = [0u8, 97, 115, 109, 1, 0, 0, 0, n as u8];
            let mut info = module_info("a", "m", &bytes);
            info.version = version.map(str::to_owned);
            info.created_unix_ms = 10 + n as u64;
            ModuleStore::insert(&db, &info, &bytes).unwrap();
        }
        let version = |m: Option<ModuleInfo>| m.map(|m| m.version);
        assert_eq!(
            version(db.newest("a", "m").unwrap()),
            Some(Some("2".into()))
        );
        assert_eq!(version(db.named("a", "m", None).unwrap()), Some(None));
        assert_eq!(
            version(db.named("a", "m", Some("1")).unwrap()),
            Some(Some("1".into()))
        );
        assert_eq!(db.named("a", "m", Some("3")).unwrap(), None);
        assert_eq!(db.newest("a", "other").unwrap(), None);
        assert_eq!(db.newest("b", "m").unwrap(), None);
    }

    /// Issue 11: a module's manifest outlived the module, so uploading the same bytes
    /// again revived options the tenant had forgotten.
    #[test]
    fn a_manifest_is_deleted_with_its_module() {
        use crate::manifest::{self, Manifest};
        let db = Database::in_memory().unwrap();
        let bytes = b"\0asm\x01\0\0\0";
        let id = ModuleId::of(bytes);
        let manifest = Manifest {
            timeout_ms: Some(5),
            ..Manifest::default()
        };
        for tenant in ["a", "b"] {
            db.create_tenant(tenant).unwrap();
            ModuleStore::insert(&db, &module_info(tenant, "m", bytes), bytes).unwrap();
            manifest::upsert(&db.lock(), tenant, &id.to_string(), &manifest, 0).unwrap();
        }
        assert!(ModuleStore::delete(&db, "a", &id).unwrap());
        assert_eq!(
            manifest::get(&db.read(), "a", &id.to_string()).unwrap(),
            None
        );
        assert_eq!(
            manifest::get(&db.read(), "b", &id.to_string()).unwrap(),
            Some(manifest)
        );
    }

    #[test]
    fn kv_is_scoped_by_tenant_and_lists_by_prefix() {
        let db = Database::in_memory().unwrap();
        KvStore::set(&db, "a", "user:1", b"x").unwrap();
        KvStore::set(&db, "a", "user:2", b"y").unwrap();
        KvStore::set(&db, "a", "other", b"z").unwrap();
        KvStore::set(&db, "a", "user:1", b"x2").unwrap();
        assert_eq!(
            KvStore::get(&db, "a", "user:1").unwrap(),
            Some(b"x2".to_vec())
        );
        assert_eq!(KvStore::get(&db, "b", "user:1").unwrap(), None);
        assert_eq!(
            KvStore::keys(&db, "a", "user:").unwrap(),
            vec!["user:1", "user:2"]
        );
        assert!(KvStore::delete(&db, "a", "other").unwrap());
        assert!(!KvStore::delete(&db, "b", "user:1").unwrap());
    }
}
