//! Plug-in KV (`kv_get`, `kv_set`, `kv_delete`, the KV API) on the agent's database: the
//! `kv` table, or, once the agent is in a cluster, the cluster's store, which it hands
//! over to (`SharedKv`).

use std::sync::Arc;

use deadlift_engine::host::{KvError, KvStore};
use rusqlite::{OptionalExtension, params};

use super::{Database, DbError};
use crate::clock::now_ms;

/// Where plug-in KV lives once the agent is in a cluster.
#[derive(Default)]
pub(super) struct SharedKv(std::sync::OnceLock<Arc<dyn KvStore>>);

impl SharedKv {
    fn get(&self) -> Option<&Arc<dyn KvStore>> {
        self.0.get()
    }
}

impl std::fmt::Debug for SharedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "SharedKv(cluster)"
        } else {
            "SharedKv(local)"
        })
    }
}

impl Database {
    /// From now on plug-in KV (`KvStore`) is `kv`'s: the cluster's.
    pub(crate) fn share_kv(&self, kv: Arc<dyn KvStore>) {
        let _ = self.shared_kv.0.set(kv);
    }

    /// Every plug-in KV entry in this file: (tenant, key, value).
    pub(crate) fn kv_entries(&self) -> Result<Vec<(String, String, Vec<u8>)>, DbError> {
        let conn = self.reader.lock();
        let mut statement =
            conn.prepare("SELECT tenant, key, value FROM kv ORDER BY tenant, key")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl KvStore for Database {
    fn get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(shared) = self.shared_kv.get() {
            return shared.get(tenant, key);
        }
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM kv WHERE tenant = ?1 AND key = ?2",
                params![tenant, key],
                |row| row.get(0),
            )
            .optional()
            .map_err(DbError::from)?)
    }

    fn set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        if let Some(shared) = self.shared_kv.get() {
            return shared.set(tenant, key, value);
        }
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(DbError::from)?;
        tx.execute(
            "INSERT OR IGNORE INTO tenants (name, created_unix_ms) VALUES (?1, ?2)",
            params![tenant, now_ms()],
        )
        .map_err(DbError::from)?;
        tx.execute(
            "INSERT INTO kv (tenant, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (tenant, key) DO UPDATE SET value = excluded.value",
            params![tenant, key, value],
        )
        .map_err(DbError::from)?;
        tx.commit().map_err(DbError::from)?;
        Ok(())
    }

    fn delete(&self, tenant: &str, key: &str) -> Result<bool, KvError> {
        if let Some(shared) = self.shared_kv.get() {
            return shared.delete(tenant, key);
        }
        Ok(self
            .conn()
            .execute(
                "DELETE FROM kv WHERE tenant = ?1 AND key = ?2",
                params![tenant, key],
            )
            .map_err(DbError::from)?
            == 1)
    }

    fn keys(&self, tenant: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        if let Some(shared) = self.shared_kv.get() {
            return shared.keys(tenant, prefix);
        }
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT key FROM kv WHERE tenant = ?1 AND substr(key, 1, length(?2)) = ?2
                 ORDER BY key",
            )
            .map_err(DbError::from)?;
        let keys = stmt
            .query_map(params![tenant, prefix], |row| row.get(0))
            .map_err(DbError::from)?
            .collect::<Result<_, _>>()
            .map_err(DbError::from)?;
        Ok(keys)
    }
}
