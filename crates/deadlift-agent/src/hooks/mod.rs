//! Extension points ("hooks"): named call sites of the application that embeds the agent,
//! such as `before_charge`. The application declares a hook with the host functions and
//! limits it offers there ([`HookDecl`]). A tenant binds one of its modules' functions
//! to it ([`Binding`], checked against the module's exports and imports). The
//! application then calls `agent.hook("before_charge").call(tenant, input)` and gets the
//! output. The call runs on the same step executor as workflow steps and is recorded as
//! a run (workflow `hook:<name>`, one step `call`, with logs). Bindings are stored in
//! the agent's database; `store.rs` holds their SQL.

mod store;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::now_ms;
use crate::store::{Database, DbError};
use crate::workflow::spec::{Action, RetrySpec, Step};
use crate::workflow::{Failure, NewRun, Runtime, TraceParent, TriggerKind};
use deadlift_engine::{CancelToken, Code, Engine, Grant};

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
    /// The module `module` resolved to when bound (`sha256:...`): what every call runs
    /// until the tenant binds again. Set by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
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
    /// The bound function failed (the call is recorded as a failed run).
    #[error("the hook's module failed: {}", .0.message)]
    Failed(Failure),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl HookError {
    pub fn code(&self) -> Code {
        match self {
            Self::Unknown(_) => Code::HookNotFound,
            Self::NotBound { .. } => Code::HookNotBound,
            Self::Invalid(_) => Code::BindingInvalid,
            Self::Failed(failure) => failure.code,
            Self::Db(error) => error.code(),
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

impl From<tokio::task::JoinError> for HookError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Db(DbError::from(e))
    }
}

/// The hooks an agent declares, and its tenants' bindings to them.
#[derive(Debug)]
pub struct Hooks {
    declared: BTreeMap<String, HookDecl>,
    db: Database,
    engine: Engine,
}

impl Hooks {
    pub(crate) fn new(declared: Vec<HookDecl>, db: Database, engine: Engine) -> Self {
        Self {
            declared: declared
                .into_iter()
                .map(|hook| (hook.name.clone(), hook))
                .collect(),
            db,
            engine,
        }
    }

    /// The declared hooks, with `tenant`'s bindings.
    pub async fn list(&self, tenant: &str) -> Result<Vec<HookInfo>, HookError> {
        let mut listed = Vec::new();
        for hook in self.declared.values() {
            listed.push(HookInfo {
                name: hook.name.clone(),
                description: hook.description.clone(),
                host_functions: hook.grant.host_functions.clone(),
                timeout_ms: u64::try_from(hook.grant.timeout.as_millis()).unwrap_or(u64::MAX),
                binding: self.binding(tenant, &hook.name).await?,
            });
        }
        Ok(listed)
    }

    /// `tenant`'s bindings to `name` by its bare name, with what each needs of the
    /// version that serves it.
    pub async fn name_uses(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Vec<crate::releases::NameUse>, HookError> {
        let mut uses = Vec::new();
        for hook in self.declared.values() {
            if let Some(binding) = self.binding(tenant, &hook.name).await?
                && binding.module == name
            {
                uses.push(crate::releases::NameUse {
                    user: format!("hook `{}`", hook.name),
                    function: binding.function,
                    host_functions: hook.grant.host_functions.clone(),
                });
            }
        }
        Ok(uses)
    }

    /// `tenant`'s binding to `hook`, if any.
    pub async fn binding(&self, tenant: &str, hook: &str) -> Result<Option<Binding>, HookError> {
        let (db, tenant, hook) = (self.db.clone(), tenant.to_owned(), hook.to_owned());
        Ok(tokio::task::spawn_blocking(move || store::get(&db.read(), &tenant, &hook)).await??)
    }

    /// Binds a tenant's module function to a declared hook, after checking that the
    /// module exports it and imports only host functions the hook offers.
    pub async fn bind(&self, tenant: &str, mut binding: Binding) -> Result<(), HookError> {
        let declared = self
            .declared
            .get(&binding.hook)
            .ok_or_else(|| HookError::Unknown(binding.hook.clone()))?;
        let offered = declared.grant.host_functions.clone();
        let (engine, db, tenant) = (self.engine.clone(), self.db.clone(), tenant.to_owned());
        tokio::task::spawn_blocking(move || {
            let module = engine
                .registry()
                .resolve(&tenant, &binding.module)
                .map_err(|e| HookError::Invalid(format!("module `{}`: {e}", binding.module)))?;
            if !module
                .exports
                .iter()
                .any(|e| e.kind == "function" && e.name == binding.function)
            {
                return Err(HookError::Invalid(format!(
                    "module `{}` exports no function `{}`",
                    binding.module, binding.function
                )));
            }
            if let Some(import) = module
                .imports
                .iter()
                .find(|i| i.module == "extism:host/user" && !offered.contains(&i.name))
            {
                return Err(HookError::Invalid(format!(
                    "module `{}` imports host function `{}`, which hook `{}` does not offer",
                    binding.module, import.name, binding.hook
                )));
            }
            binding.pinned = Some(module.id.to_string());
            Ok(store::upsert(&db.lock(), &tenant, &binding, now_ms())?)
        })
        .await?
    }

    pub async fn unbind(&self, tenant: &str, hook: &str) -> Result<(), HookError> {
        let (db, owner, name) = (self.db.clone(), tenant.to_owned(), hook.to_owned());
        let removed =
            tokio::task::spawn_blocking(move || store::remove(&db.lock(), &owner, &name)).await??;
        if removed {
            Ok(())
        } else {
            Err(HookError::NotBound {
                tenant: tenant.to_owned(),
                hook: hook.to_owned(),
            })
        }
    }
}

/// A declared extension point, ready to call.
#[derive(Debug)]
pub struct Hook<'a> {
    pub(crate) hooks: &'a Hooks,
    pub(crate) runtime: &'a Runtime,
    pub(crate) name: &'a str,
}

impl Hook<'_> {
    /// Calls the module function `tenant` bound here with `input`, under the hook's
    /// grant, and records the call as a run.
    pub async fn call(&self, tenant: &str, input: Value) -> Result<HookOutput, HookError> {
        self.call_in_trace(tenant, input, None).await
    }

    /// [`call`](Self::call) within an existing trace.
    pub async fn call_in_trace(
        &self,
        tenant: &str,
        input: Value,
        trace: Option<TraceParent>,
    ) -> Result<HookOutput, HookError> {
        let declared = self
            .hooks
            .declared
            .get(self.name)
            .ok_or_else(|| HookError::Unknown(self.name.to_owned()))?;
        let binding = self
            .hooks
            .binding(tenant, self.name)
            .await?
            .ok_or_else(|| HookError::NotBound {
                tenant: tenant.to_owned(),
                hook: self.name.to_owned(),
            })?;
        let trace = trace.map_or_else(TraceParent::new_root, |t| t.child());
        let step = Step {
            id: "call".into(),
            condition: None,
            input: None,
            needs: Vec::new(),
            action: Action::Call {
                // A bare name goes to its release at each call (its live version, or
                // a canary); `name@version` and ids stay pinned.
                module: if crate::releases::is_bare_name(&binding.module) {
                    binding.module
                } else {
                    binding.pinned.unwrap_or(binding.module)
                },
                function: binding.function,
                grant: Box::new(declared.grant.clone()),
                // A hook's caller is waiting: one attempt.
                retry: RetrySpec::default(),
            },
        };
        let cancel = CancelToken::new();
        // The run is recorded after the call, so the call carries no run id (rather
        // than one that names no run).
        let at = crate::workflow::StepScope {
            tenant,
            run_id: None,
            trace: &trace,
            depth: 0,
            source: self.runtime.source(),
            workflow: None,
            cancel: &cancel,
            // The embedder declared the hook's grant: the operator's, not a tenant's.
            tenant_grant: false,
        };
        let outcome = self.runtime.run_step(at, &step, input.clone()).await;
        let failure = outcome.failure().cloned();
        let output = failure.is_none().then(|| outcome.record.output.clone());
        let run = NewRun {
            tenant: tenant.to_owned(),
            workflow: format!("hook:{}", self.name),
            version: 0,
            trigger: TriggerKind::Hook,
            input,
            event: None,
            trace,
        };
        let run_id = self
            .runtime
            .record(run, outcome, failure.clone(), output.clone())
            .await?;
        match (failure, output) {
            (Some(failure), _) => Err(HookError::Failed(failure)),
            (None, output) => Ok(HookOutput {
                output: output.unwrap_or(Value::Null),
                run_id,
                trace,
            }),
        }
    }
}
