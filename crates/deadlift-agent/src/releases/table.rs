//! Releases in the database and in memory: `ReleaseTable`, one `Release` per (tenant,
//! name) kept in memory and written through (SQL first), the SQL of the
//! `module_releases` and `module_release_history` tables, and what the module store's
//! insert and delete do to releases.

use std::collections::HashMap;
use std::sync::Arc;

use deadlift_engine::registry::{ModuleId, ModuleInfo};
use parking_lot::RwLock;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{HistoryEntry, Release, Version};
use crate::clock::now_ms;
use crate::store::DbError;

/// History entries kept per name.
const HISTORY_KEPT: i64 = 100;

/// The releases of every tenant's names, in memory.
#[derive(Debug, Default)]
pub struct ReleaseTable {
    rows: RwLock<HashMap<(String, String), Arc<Release>>>,
}

impl ReleaseTable {
    pub(crate) fn load(conn: &Connection) -> Result<Self, DbError> {
        let mut stmt = conn.prepare(
            "SELECT tenant, name, live, live_version, previous, previous_version, rollout
             FROM module_releases",
        )?;
        let mut rows = HashMap::new();
        let mut query = stmt.query([])?;
        while let Some(row) = query.next()? {
            let (tenant, name): (String, String) = (row.get(0)?, row.get(1)?);
            let release = decode_row(row)?;
            rows.insert((tenant, name), Arc::new(release));
        }
        Ok(Self {
            rows: RwLock::new(rows),
        })
    }

    pub fn get(&self, tenant: &str, name: &str) -> Option<Arc<Release>> {
        self.rows
            .read()
            .get(&(tenant.to_owned(), name.to_owned()))
            .cloned()
    }

    /// `tenant`'s names that have a release.
    pub(crate) fn names(&self, tenant: &str) -> Vec<String> {
        self.rows
            .read()
            .keys()
            .filter(|(owner, _)| owner == tenant)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// How many of `tenant`'s names have a rollout in progress.
    pub(super) fn rollouts(&self, tenant: &str) -> usize {
        self.rows
            .read()
            .iter()
            .filter(|((owner, _), release)| owner == tenant && release.rollout.is_some())
            .count()
    }

    pub(crate) fn put(&self, tenant: &str, name: &str, release: Option<Release>) {
        let key = (tenant.to_owned(), name.to_owned());
        let mut rows = self.rows.write();
        match release {
            Some(release) => rows.insert(key, Arc::new(release)),
            None => rows.remove(&key),
        };
    }

    /// Ends the rollout that started at `started` if it is still the one in progress;
    /// whether it was.
    pub(super) fn end_rollout(&self, tenant: &str, name: &str, started: i64) -> bool {
        let key = (tenant.to_owned(), name.to_owned());
        let mut rows = self.rows.write();
        let Some(release) = rows.get(&key) else {
            return false;
        };
        if release.rollout.as_ref().map(|r| r.started_unix_ms) != Some(started) {
            return false;
        }
        let mut ended = Release::clone(release);
        ended.rollout = None;
        rows.insert(key, Arc::new(ended));
        true
    }
}

fn decode_row(row: &rusqlite::Row<'_>) -> Result<Release, DbError> {
    let corrupt = |what: &str| DbError::Corrupt(format!("module release: {what}"));
    let id = |text: String| {
        text.parse::<ModuleId>()
            .map_err(|_| corrupt("not a module id"))
    };
    let live = Version {
        module: id(row.get(2)?)?,
        version: row.get(3)?,
    };
    let previous = match row.get::<_, Option<String>>(4)? {
        Some(text) => Some(Version {
            module: id(text)?,
            version: row.get(5)?,
        }),
        None => None,
    };
    let rollout = match row.get::<_, Option<String>>(6)? {
        Some(text) => Some(serde_json::from_str(&text).map_err(|_| corrupt("rollout"))?),
        None => None,
    };
    Ok(Release {
        live,
        previous,
        rollout,
    })
}

/// Writes a name's release (or removes it) and a history entry, in the caller's
/// transaction.
pub(super) fn write_row(
    tx: &Transaction<'_>,
    tenant: &str,
    name: &str,
    release: Option<&Release>,
    entry: &HistoryEntry,
) -> Result<(), DbError> {
    put_row(tx, tenant, name, release, entry.at_unix_ms)?;
    tx.execute(
        "INSERT INTO module_release_history (tenant, name, at_unix_ms, action, module, version, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            tenant,
            name,
            entry.at_unix_ms,
            entry.action,
            entry.module.to_string(),
            entry.version,
            entry.detail
        ],
    )?;
    tx.execute(
        "DELETE FROM module_release_history WHERE tenant = ?1 AND name = ?2 AND id <= (
             SELECT id FROM module_release_history WHERE tenant = ?1 AND name = ?2
             ORDER BY id DESC LIMIT 1 OFFSET ?3)",
        params![tenant, name, HISTORY_KEPT],
    )?;
    Ok(())
}

/// Writes a name's release (or removes it), in the caller's transaction.
pub(super) fn put_row(
    tx: &Transaction<'_>,
    tenant: &str,
    name: &str,
    release: Option<&Release>,
    now: i64,
) -> Result<(), DbError> {
    match release {
        Some(release) => {
            let rollout = release
                .rollout
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| DbError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO module_releases
                     (tenant, name, live, live_version, previous, previous_version, rollout, updated_unix_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (tenant, name) DO UPDATE SET live = ?3, live_version = ?4,
                     previous = ?5, previous_version = ?6, rollout = ?7, updated_unix_ms = ?8",
                params![
                    tenant,
                    name,
                    release.live.module.to_string(),
                    release.live.version,
                    release.previous.as_ref().map(|p| p.module.to_string()),
                    release.previous.as_ref().and_then(|p| p.version.clone()),
                    rollout,
                    now,
                ],
            )?;
        }
        None => {
            tx.execute(
                "DELETE FROM module_releases WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
            )?;
        }
    }
    Ok(())
}

pub(super) fn entry(action: &str, version: &Version, detail: Option<String>) -> HistoryEntry {
    HistoryEntry {
        at_unix_ms: now_ms(),
        action: action.to_owned(),
        module: version.module,
        version: version.version.clone(),
        detail,
    }
}

/// In the module store's insert: the first version of a name goes live. Returns the new
/// release, to put in memory after the commit.
pub(crate) fn on_insert(
    tx: &Transaction<'_>,
    info: &ModuleInfo,
) -> Result<Option<Release>, DbError> {
    let exists = tx
        .query_row(
            "SELECT 1 FROM module_releases WHERE tenant = ?1 AND name = ?2",
            params![info.tenant, info.name],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if exists {
        return Ok(None);
    }
    let release = Release {
        live: Version::of(info),
        previous: None,
        rollout: None,
    };
    write_row(
        tx,
        &info.tenant,
        &info.name,
        Some(&release),
        &entry("released", &release.live, None),
    )?;
    Ok(Some(release))
}

/// In the module store's delete: a deleted candidate ends its rollout; a deleted live
/// version leaves its name to the newest other version, or the name goes. Returns the
/// changed release (`None`: removed), to put in memory after the commit.
pub(crate) fn on_delete(
    tx: &Transaction<'_>,
    table: &ReleaseTable,
    info: &ModuleInfo,
) -> Result<Option<Option<Release>>, DbError> {
    let Some(current) = table.get(&info.tenant, &info.name) else {
        return Ok(None);
    };
    let mut release = Release::clone(&current);
    let deleted = Version::of(info);
    let mut changed = false;
    if release
        .rollout
        .as_ref()
        .is_some_and(|r| r.candidate.module == info.id)
    {
        release.rollout = None;
        changed = true;
    }
    if release
        .previous
        .as_ref()
        .is_some_and(|p| p.module == info.id)
    {
        release.previous = None;
        changed = true;
    }
    let mut replaced = Some(release);
    if current.live.module == info.id {
        changed = true;
        let next: Option<(String, String)> = tx
            .query_row(
                "SELECT id, version FROM modules WHERE tenant = ?1 AND name = ?2 AND id != ?3
                 ORDER BY created_unix_ms DESC, rowid DESC LIMIT 1",
                params![info.tenant, info.name, info.id.to_string()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        replaced = match next {
            Some((id, version)) => Some(Release {
                live: Version {
                    module: id
                        .parse()
                        .map_err(|_| DbError::Corrupt("module id".into()))?,
                    version: Some(version).filter(|v| !v.is_empty()),
                },
                previous: None,
                rollout: None,
            }),
            None => None,
        };
    }
    if !changed {
        return Ok(None);
    }
    write_row(
        tx,
        &info.tenant,
        &info.name,
        replaced.as_ref(),
        &entry("deleted", &deleted, None),
    )?;
    Ok(Some(replaced))
}

pub(super) fn history(
    conn: &Connection,
    tenant: &str,
    name: &str,
) -> Result<Vec<HistoryEntry>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT at_unix_ms, action, module, version, detail FROM module_release_history
         WHERE tenant = ?1 AND name = ?2 ORDER BY id DESC LIMIT 20",
    )?;
    let rows = stmt.query_map(params![tenant, name], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, Option<String>>(3)?,
            row.get::<_, Option<String>>(4)?,
        ))
    })?;
    let mut entries = Vec::new();
    for row in rows {
        let (at_unix_ms, action, module, version, detail) = row?;
        entries.push(HistoryEntry {
            at_unix_ms,
            action,
            module: module
                .parse()
                .map_err(|_| DbError::Corrupt("module release history".into()))?,
            version,
            detail,
        });
    }
    Ok(entries)
}
