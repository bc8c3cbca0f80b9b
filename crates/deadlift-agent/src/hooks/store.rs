//! The SQL of hook bindings (table `hook_bindings`): a tenant's module function bound
//! to a declared hook.

use rusqlite::{Connection, OptionalExtension, params};

use super::Binding;
use crate::store::DbError;

pub(crate) fn upsert(
    conn: &Connection,
    tenant: &str,
    binding: &Binding,
    now: i64,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO hook_bindings (tenant, hook, module, function, updated_unix_ms, module_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (tenant, hook) DO UPDATE SET module = excluded.module, function = excluded.function,
            updated_unix_ms = excluded.updated_unix_ms, module_id = excluded.module_id",
        params![
            tenant,
            binding.hook,
            binding.module,
            binding.function,
            now,
            binding.pinned
        ],
    )?;
    Ok(())
}

pub(crate) fn remove(conn: &Connection, tenant: &str, hook: &str) -> Result<bool, DbError> {
    Ok(conn.execute(
        "DELETE FROM hook_bindings WHERE tenant = ?1 AND hook = ?2",
        params![tenant, hook],
    )? > 0)
}

pub(crate) fn get(conn: &Connection, tenant: &str, hook: &str) -> Result<Option<Binding>, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT hook, module, function, updated_unix_ms, module_id FROM hook_bindings
             WHERE tenant = ?1 AND hook = ?2",
        )?
        .query_row(params![tenant, hook], |row| {
            Ok(Binding {
                hook: row.get(0)?,
                module: row.get(1)?,
                function: row.get(2)?,
                updated_unix_ms: row.get(3)?,
                pinned: row.get(4)?,
            })
        })
        .optional()?)
}
