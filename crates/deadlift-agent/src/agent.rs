//! The agent: an [`Engine`] wired to durable storage in a data directory, with tenants,
//! API tokens, the workflow [`Runtime`] and the defaults the server applies. Built by [`AgentBuilder`]; the HTTP
//! server (`server`) is one way to drive it, an embedding application is another.

use std::path::PathBuf;
use std::sync::Arc;

use crate::federation::Identity;
use crate::hooks::{self, Binding, HookDecl, HookError, HookInfo, HookOutput};
use crate::store::{Database, DbError, Durability, Principal};
use crate::workflow::TraceParent;
use crate::workflow::{Inbox, InboxSink, Retention, Runtime, RuntimeConfig};
use deadlift_engine::engine::{Engine, EngineError};
use deadlift_engine::grant::Grant;
use deadlift_engine::host::CallContext;
use deadlift_engine::host::HostFunction;

/// The tenant the Deadlift v1 routes act for.
pub const DEFAULT_TENANT: &str = "default";

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
}

/// Builds an [`Agent`].
#[derive(Debug)]
pub struct AgentBuilder {
    data_dir: PathBuf,
    admin_token: Option<String>,
    v1_requires_token: bool,
    default_grant: Grant,
    max_body_bytes: usize,
    workers: Option<usize>,
    host_functions: Vec<HostFunction>,
    runtime: RuntimeConfig,
    durability: Durability,
    name: String,
    hooks: Vec<HookDecl>,
}

impl AgentBuilder {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            admin_token: None,
            v1_requires_token: false,
            default_grant: Grant::default(),
            max_body_bytes: 16 * 1024 * 1024,
            workers: None,
            host_functions: Vec::new(),
            runtime: RuntimeConfig::default(),
            durability: Durability::default(),
            name: "deadlift".into(),
            hooks: Vec::new(),
        }
    }

    /// Use this admin token instead of generating one at first start.
    pub fn admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = token;
        self
    }

    /// Whether the Deadlift v1 routes need a token (the original needed none).
    pub fn v1_requires_token(mut self, required: bool) -> Self {
        self.v1_requires_token = required;
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

    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    pub fn host_function(mut self, function: HostFunction) -> Self {
        self.host_functions.push(function);
        self
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

    /// How deliveries to peers are retried.
    pub fn delivery(mut self, delivery: crate::federation::deliver::DeliveryConfig) -> Self {
        self.runtime.delivery = delivery;
        self
    }

    /// Opens the data directory and starts the engine. Returns the agent and, when an
    /// admin token was generated now (first start), that token: it is shown only once.
    pub fn build(self) -> Result<(Agent, Option<String>), AgentError> {
        std::fs::create_dir_all(&self.data_dir).map_err(|source| AgentError::DataDir {
            path: self.data_dir.clone(),
            source,
        })?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(AgentError::NoRuntime);
        }
        let db = Database::open_with(&self.data_dir.join("agent.db"), self.durability)?;
        db.create_tenant(DEFAULT_TENANT)?;
        let (inbox, inbox_receiver) = Inbox::new();
        let mut engine = Engine::builder()
            .data_dir(&self.data_dir)
            .kv(Arc::new(db.clone()))
            .modules(Arc::new(db.clone()))
            .events(Arc::new(InboxSink::new(
                inbox.clone(),
                self.runtime.source.clone(),
            )));
        if let Some(workers) = self.workers {
            engine = engine.workers(workers);
        }
        for function in self.host_functions {
            engine = engine.host_function(function);
        }
        let engine = engine.build()?;
        let new_admin_token = match self.admin_token {
            Some(token) => {
                if db.authenticate(&token)? != Some(Principal::Admin) {
                    db.add_token(&token, &Principal::Admin, Some("given at start"))?;
                }
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
        let workflows = Runtime::start(
            db.clone(),
            engine.clone(),
            inbox,
            inbox_receiver,
            self.runtime,
            identity,
        )?;
        let agent = Agent {
            hooks: self
                .hooks
                .into_iter()
                .map(|hook| (hook.name.clone(), hook))
                .collect(),
            workflows,
            engine,
            db,
            data_dir: self.data_dir,
            v1_requires_token: self.v1_requires_token,
            default_grant: self.default_grant,
            max_body_bytes: self.max_body_bytes,
        };
        Ok((agent, new_admin_token))
    }
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
    hooks: std::collections::BTreeMap<String, HookDecl>,
    workflows: Runtime,
    engine: Engine,
    db: Database,
    data_dir: PathBuf,
    v1_requires_token: bool,
    default_grant: Grant,
    max_body_bytes: usize,
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

    /// A declared extension point, to call.
    pub fn hook<'a>(&'a self, name: &'a str) -> Hook<'a> {
        Hook { agent: self, name }
    }

    /// The declared hooks, with `tenant`'s bindings.
    pub async fn hooks(&self, tenant: &str) -> Result<Vec<HookInfo>, HookError> {
        let mut listed = Vec::new();
        for hook in self.hooks.values() {
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

    async fn binding(&self, tenant: &str, hook: &str) -> Result<Option<Binding>, HookError> {
        let (db, tenant, hook) = (self.db.clone(), tenant.to_owned(), hook.to_owned());
        tokio::task::spawn_blocking(move || hooks::get(&db.read(), &tenant, &hook))
            .await
            .map_err(|e| DbError::Commit(e.to_string()))?
            .map_err(HookError::from)
    }

    /// Binds a tenant's module function to a declared hook, after checking that the
    /// module exports it and imports only host functions the hook offers.
    pub async fn bind_hook(&self, tenant: &str, binding: Binding) -> Result<(), HookError> {
        let declared = self
            .hooks
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
            let now = crate::clock::now_ms();
            Ok(hooks::upsert(&db.lock(), &tenant, &binding, now)?)
        })
        .await
        .map_err(|e| DbError::Commit(e.to_string()))?
    }

    pub async fn unbind_hook(&self, tenant: &str, hook: &str) -> Result<(), HookError> {
        let (db, owner, name) = (self.db.clone(), tenant.to_owned(), hook.to_owned());
        let removed = tokio::task::spawn_blocking(move || hooks::remove(&db.lock(), &owner, &name))
            .await
            .map_err(|e| DbError::Commit(e.to_string()))??;
        if removed {
            Ok(())
        } else {
            Err(HookError::NotBound {
                tenant: tenant.to_owned(),
                hook: hook.to_owned(),
            })
        }
    }

    /// Stops background work and commits what the journal holds. Runs still executing
    /// resume at the next start.
    pub async fn shutdown(&self) {
        self.workflows.shutdown().await;
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn v1_requires_token(&self) -> bool {
        self.v1_requires_token
    }

    pub fn default_grant(&self) -> &Grant {
        &self.default_grant
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }
}

/// A declared extension point of an [`Agent`], ready to call.
#[derive(Debug)]
pub struct Hook<'a> {
    agent: &'a Agent,
    name: &'a str,
}

impl Hook<'_> {
    /// Calls the module function `tenant` bound here with `input`, under the hook's
    /// grant, and records the call as a run.
    pub async fn call(
        &self,
        tenant: &str,
        input: serde_json::Value,
    ) -> Result<HookOutput, HookError> {
        self.call_in_trace(tenant, input, None).await
    }

    /// [`call`](Self::call) within an existing trace.
    pub async fn call_in_trace(
        &self,
        tenant: &str,
        input: serde_json::Value,
        trace: Option<TraceParent>,
    ) -> Result<HookOutput, HookError> {
        use crate::workflow::{Failure, NewRun, StepRecord, StepStatus, TriggerKind};
        let agent = self.agent;
        let declared = agent
            .hooks
            .get(self.name)
            .ok_or_else(|| HookError::Unknown(self.name.to_owned()))?;
        let binding =
            agent
                .binding(tenant, self.name)
                .await?
                .ok_or_else(|| HookError::NotBound {
                    tenant: tenant.to_owned(),
                    hook: self.name.to_owned(),
                })?;
        let trace = trace.map_or_else(TraceParent::new_root, |t| t.child());
        let started = crate::clock::now_ms();
        let (engine, owner, reference) = (
            agent.engine.clone(),
            tenant.to_owned(),
            binding.module.clone(),
        );
        let module =
            tokio::task::spawn_blocking(move || engine.registry().resolve(&owner, &reference))
                .await
                .map_err(|e| DbError::Commit(e.to_string()))?
                .map_err(|e| HookError::Invalid(e.to_string()))?;
        let buffer = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        // The run is recorded after the call, so the call carries no run id (rather
        // than one that names no run).
        let ctx = CallContext::new(tenant).with_emit_buffer(buffer.clone());
        let bytes = serde_json::to_vec(&input).unwrap_or_default();
        let called = agent
            .engine
            .call(&module.id, &binding.function, &bytes, &declared.grant, &ctx)
            .await;
        let outcome: Result<(serde_json::Value, Vec<deadlift_engine::LogLine>), HookError> =
            match called {
                Ok(out) if out.output.is_empty() => Ok((serde_json::Value::Null, out.logs)),
                Ok(out) => serde_json::from_slice(&out.output)
                    .map(|v| (v, out.logs))
                    .map_err(|e| HookError::OutputNotJson(e.to_string())),
                Err(error) => Err(HookError::Call(error)),
            };
        let emitted: Vec<crate::workflow::CloudEvent> = std::mem::take(&mut *buffer.lock())
            .into_iter()
            .map(|e| {
                agent
                    .workflows
                    .event_in_trace(&e.event_type, e.data, &trace)
            })
            .collect();
        let failure = outcome.as_ref().err().map(|error| Failure {
            step: Some("call".into()),
            code: error.code(),
            kind: match error {
                HookError::Call(call) => Some(crate::workflow::spec::ErrorKind::of(call)),
                _ => None,
            },
            message: error.to_string(),
        });
        let (output, logs) = match &outcome {
            Ok((output, logs)) => (Some(output.clone()), logs.clone()),
            Err(_) => (None, Vec::new()),
        };
        let step = StepRecord {
            id: "call".into(),
            status: if failure.is_some() {
                StepStatus::Failed
            } else {
                StepStatus::Succeeded
            },
            module: Some(module.id.to_string()),
            input: input.clone(),
            output: output.clone().unwrap_or(serde_json::Value::Null),
            logs,
            attempts: 1,
            attempt_errors: Vec::new(),
            started_unix_ms: started,
            finished_unix_ms: crate::clock::now_ms(),
            error: failure.clone(),
            emitted: emitted.iter().map(|e| e.id.clone()).collect(),
        };
        let run = NewRun {
            tenant: tenant.to_owned(),
            workflow: format!("hook:{}", self.name),
            version: 0,
            trigger: TriggerKind::Hook,
            input,
            event: None,
            trace,
        };
        let run_id = agent
            .workflows
            .record(run, vec![step], emitted, failure, output)
            .await
            .map_err(|e| HookError::Db(DbError::Commit(e.to_string())))?;
        let (output, _) = outcome?;
        Ok(HookOutput {
            output,
            run_id,
            trace,
        })
    }
}
