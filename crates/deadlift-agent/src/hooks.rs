//! Extension points ("hooks"): named call sites of the application that embeds the agent,
//! such as `before_charge`. The application declares a hook with the host functions and
//! limits it offers there. A tenant binds one of its modules' functions to it. The
//! application then calls `agent.hook("before_charge").call(tenant, input)` and gets the
//! output. Each call is recorded as a run (workflow `hook:<name>`, one step, with logs).
//! Bindings are stored in the agent's database; this file holds their SQL.

use std::collections::BTreeSet;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::DbError;
use crate::workflow::TraceParent;
use deadlift_engine::Code;
use deadlift_engine::error::CallError;
use deadlift_engine::grant::Grant;

/// A hook the application offers.
#[derive(Debug, Clone)]
pub struct HookDecl {
    pub name: String,
    /// What a bound module may do at this hook: its host functions and limits.
    pub grant: Grant,
    pub description: String,
}

impl HookDecl {
    pub fn new(name: impl Into<String>, grant: Grant) -> Self {
        Self {
            name: name.into(),
            grant,
            description: String::new(),
        }
    }

    pub fn describe(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }
}

/// A tenant's module function bound to a hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Binding {
    pub hook: String,
    /// Module reference: name, `name@version` or `sha256:...`.
    pub module: String,
    pub function: String,
    #[serde(default)]
    pub updated_unix_ms: i64,
}

/// A declared hook as listed to a tenant, with the tenant's binding if any.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HookInfo {
    pub name: String,
    pub description: String,
    pub host_functions: BTreeSet<String>,
    pub timeout_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<Binding>,
}

/// Why a hook call or binding failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("this agent declares no hook named `{0}`")]
    Unknown(String),
    #[error("tenant `{tenant}` has bound nothing to hook `{hook}`")]
    NotBound { tenant: String, hook: String },
    #[error("the binding is invalid: {0}")]
    Invalid(String),
    #[error("the hook's module failed: {0}")]
    Call(#[from] CallError),
    #[error("the hook's module output is not JSON: {0}")]
    OutputNotJson(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl HookError {
    pub fn code(&self) -> Code {
        match self {
            Self::Unknown(_) => Code::HookNotFound,
            Self::NotBound { .. } => Code::HookNotBound,
            Self::Invalid(_) => Code::BindingInvalid,
            Self::Call(error) => error.code(),
            Self::OutputNotJson(_) => Code::OutputNotJson,
            Self::Db(_) => Code::Internal,
        }
    }
}

/// What a hook call returns.
#[derive(Debug, Clone)]
pub struct HookOutput {
    pub output: Value,
    /// The run recording the call.
    pub run_id: String,
    /// The trace the call ran in (events the application emits next can carry it).
    pub trace: TraceParent,
}

pub(crate) fn upsert(
    conn: &Connection,
    tenant: &str,
    binding: &Binding,
    now: i64,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO hook_bindings (tenant, hook, module, function, updated_unix_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, hook) DO UPDATE SET module = excluded.module, function = excluded.function,
            updated_unix_ms = excluded.updated_unix_ms",
        params![tenant, binding.hook, binding.module, binding.function, now],
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
            "SELECT hook, module, function, updated_unix_ms FROM hook_bindings WHERE tenant = ?1 AND hook = ?2",
        )?
        .query_row(params![tenant, hook], |row| {
            Ok(Binding {
                hook: row.get(0)?,
                module: row.get(1)?,
                function: row.get(2)?,
                updated_unix_ms: row.get(3)?,
            })
        })
        .optional()?)
}
