//! The engine: registered modules compiled once (and cached on disk), warm instances
//! pooled per module, tenant and grant, and calls run on a bounded pool of worker
//! threads behind an async API.
//!
//! ```text
//! Engine::call ─► worker thread ─► Inner::call_blocking ─► InstancePool ─► executor::Instance
//!                                        │ first use: Registry bytes ─► compile / disk cache
//! ```
//!
//! Warm instances are kept per (module, tenant, instance shape of the grant): an
//! instance carries guest state and vars, which must never cross tenants or grants.
//! The pool is last-in-first-out, so sequential calls meet the same instance and see
//! the state they left, as with one Extism `Plugin`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

mod builder;
mod compiled;
mod pools;
mod shard;
mod workers;

use builder::Runtime;
pub use builder::{EngineBuilder, EngineError};

pub use shard::{DURATION_BUCKETS_US, EngineStats};
pub use workers::Fairness;

use crate::error::CallError;
use crate::executor::{self, CallOutput, EpochTicker, Instance, LogLevel};
use crate::grant::Grant;
use crate::host::{self, CallContext};
use crate::registry::{ModuleError, ModuleId, ModuleInfo, NewModule, Registry};
use compiled::{CodeCache, CompileGate};
use pools::InstancePool;
use shard::{Counters, Shard, thread_slot};
use workers::{Admission, Job, WorkerPool};

struct Inner {
    /// Plain, then metered: index with `usize::from(metered)`.
    runtimes: [Runtime; 2],
    host_names: HashSet<String>,
    /// Outbound HTTP for `http_request`, shared by every instance.
    http: Arc<executor::http::Outbound>,
    registry: Registry,
    code: CodeCache,
    compile_gate: CompileGate,
    max_module_bytes: u64,
    shards: Box<[Shard]>,
    log_level: LogLevel,
    max_idle_per_pool: usize,
    max_memory_bytes: u64,
    stats: Counters,
    started: std::time::Instant,
    /// The embedder's async host functions, by name.
    async_host_names: HashSet<String>,
    /// Cooperative time slicing: every call is suspendable and yields after this long.
    time_slice: Option<std::time::Duration>,
    _ticker: EpochTicker,
}

/// Runs Extism plug-ins: the entry point of the library. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    workers: WorkerPool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Validates, compiles and registers a module for `tenant`. A module that does not
    /// compile is refused and nothing is stored. Validation answers before any wait for
    /// a compile slot; a tenant compiles one module at a time.
    pub fn add_module(&self, tenant: &str, module: NewModule) -> Result<ModuleInfo, ModuleError> {
        let size = module.bytes.len() as u64;
        if size > self.inner.max_module_bytes {
            return Err(ModuleError::TooLarge {
                size,
                limit: self.inner.max_module_bytes,
            });
        }
        let registry = &self.inner.registry;
        let (inspection, existing) = registry.check(tenant, &module)?;
        if let Some(existing) = existing {
            return Ok(existing);
        }
        self.inner
            .compiled(&inspection.id, &module.bytes, Some(tenant), false)?;
        registry.insert_checked(tenant, module, inspection)
    }

    /// Unregisters a tenant's module and drops that tenant's warm instances of it. When
    /// no tenant has the module any more, its compiled code leaves memory and the disk
    /// cache.
    pub fn delete_module(&self, tenant: &str, id: &ModuleId) -> Result<(), ModuleError> {
        self.inner.registry.delete(tenant, id)?;
        for shard in &self.inner.shards {
            if let Some(pools) = shard.pools_mut().get_mut(id) {
                pools.retain(|pool| pool.tenant != tenant);
            }
        }
        if matches!(
            self.inner.registry.bytes(id),
            Err(ModuleError::NotFound { .. })
        ) {
            self.inner.forget(id);
        }
        Ok(())
    }

    /// Calls `function` of `module` on a worker thread.
    ///
    /// Dropping the returned future cancels the call.
    pub async fn call(
        &self,
        module: &ModuleId,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
    ) -> Result<CallOutput, CallError> {
        let inner = self.inner.clone();
        let (module, function, input, grant) =
            (*module, function.to_owned(), input.to_vec(), grant.clone());
        let ctx = ctx.clone();
        let cancel = ctx.cancel.clone();
        let (reply, result) = tokio::sync::oneshot::channel();
        let tenant = ctx.tenant.clone();
        let counted = self.inner.clone();
        let bytes = input.len();
        let job = if self.inner.suspendable(&grant) {
            Job::Suspendable(Box::new(move |admission, suspend| {
                let outcome = match admission {
                    Admission::Run if ctx.cancel.is_cancelled() => Err(CallError::Cancelled),
                    Admission::Run => {
                        return Some(Box::pin(async move {
                            let outcome = inner
                                .call_suspendable(&module, &function, &input, &grant, &ctx, suspend)
                                .await;
                            let _ = reply.send(outcome);
                        }));
                    }
                    Admission::Shed(error) => {
                        inner.count_error(&error);
                        Err(error)
                    }
                };
                let _ = reply.send(outcome);
                None
            }))
        } else {
            Job::Blocking(Box::new(move |admission| {
                let outcome = match admission {
                    // A caller that went away while its call waited is not run.
                    Admission::Run if ctx.cancel.is_cancelled() => Err(CallError::Cancelled),
                    Admission::Run => inner.call_blocking(&module, &function, &input, &grant, &ctx),
                    Admission::Shed(error) => {
                        inner.count_error(&error);
                        Err(error)
                    }
                };
                let _ = reply.send(outcome);
            }))
        };
        self.workers
            .submit(&tenant, bytes, job)
            .inspect_err(|error| counted.count_error(error))?;
        // Armed only once the call is queued: a call refused at the door must not cancel
        // the token its caller may share with other calls.
        let cancel_on_drop = CancelOnDrop(Some(cancel));
        let outcome = result.await.unwrap_or_else(|_| {
            Err(CallError::Internal {
                message: "the worker running the call stopped".into(),
            })
        });
        cancel_on_drop.disarm();
        outcome
    }

    /// As [`call`](Self::call), but when every worker is idle the call runs on this
    /// thread, made a blocking one for the while (`block_in_place`: the runtime moves
    /// its other tasks elsewhere), which saves the hand-over to a worker and back
    /// (about a third of a lone HTTP request's time). It takes a worker's place, so
    /// every limit holds as for queued calls. Use it where the task waits for this one
    /// call and nothing else (a request handler): calls a task joins together must use
    /// `call`, or they would run one after another. Elsewhere than on a multi-thread
    /// Tokio runtime it is `call`.
    pub async fn call_direct(
        &self,
        module: &ModuleId,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
    ) -> Result<CallOutput, CallError> {
        if tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            && !self.inner.suspendable(grant)
            && let Some(_slot) = self.workers.try_run_here(&ctx.tenant)
        {
            return tokio::task::block_in_place(|| {
                self.inner
                    .call_blocking(module, function, input, grant, ctx)
            });
        }
        self.call(module, function, input, grant, ctx).await
    }

    /// Calls `function` of `module` on the current thread. For embedders that manage
    /// their own threads; never call it from async code. A call that may wait on an
    /// async host function or the network sleeps here while it waits.
    pub fn call_blocking(
        &self,
        module: &ModuleId,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
    ) -> Result<CallOutput, CallError> {
        self.inner
            .call_blocking(module, function, input, grant, ctx)
    }

    /// Whether this engine offers the named host function (built-in or the embedder's).
    pub fn offers_host_function(&self, name: &str) -> bool {
        self.inner.host_names.contains(name)
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.inner.stats;
        let shards = &self.inner.shards;
        let idle = shards
            .iter()
            .map(|shard| {
                shard
                    .pools()
                    .values()
                    .flatten()
                    .map(|p| p.idle.lock().len() as u64)
                    .sum::<u64>()
            })
            .sum();
        let sum = |f: fn(&Shard) -> &AtomicU64| -> u64 {
            shards.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
        };
        EngineStats {
            compiled: c.compiled.load(Ordering::Relaxed),
            loaded_from_cache: c.loaded_from_cache.load(Ordering::Relaxed),
            instances_created: c.instances_created.load(Ordering::Relaxed),
            instances_discarded: c.instances_discarded.load(Ordering::Relaxed),
            calls: sum(|s| &s.calls),
            call_errors: c.call_errors.load(Ordering::Relaxed),
            idle_instances: idle,
            calls_shed: self.workers.shed(),
            code_evicted: c.code_evicted.load(Ordering::Relaxed),
            code_bytes: self.inner.code.usage().0,
            code_modules: self.inner.code.usage().1,
            errors_by_code: c.errors_by_code.lock().clone(),
            duration_buckets: (0..=DURATION_BUCKETS_US.len())
                .map(|i| {
                    shards
                        .iter()
                        .map(|s| s.duration_buckets[i].load(Ordering::Relaxed))
                        .sum()
                })
                .collect(),
            duration_sum_us: sum(|s| &s.duration_sum_us),
        }
    }
}

/// Whether the call answers its host calls from a recorded tape.
fn replaying(ctx: &CallContext) -> bool {
    ctx.tape
        .as_ref()
        .is_some_and(crate::tape::Tape::is_replaying)
}

/// Cancels a call whose caller went away before it finished.
struct CancelOnDrop(Option<host::CancelToken>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.cancel();
        }
    }
}

impl Inner {
    /// Whether a call under `grant` runs with `call_async`: it may reach an async host
    /// function or the network, or every call is time-sliced.
    fn suspendable(&self, grant: &Grant) -> bool {
        self.time_slice.is_some()
            // `http_request` waits on the network.
            || !grant.allowed_hosts.is_empty()
            || (!self.async_host_names.is_empty()
                && grant
                    .host_functions
                    .iter()
                    .any(|name| self.async_host_names.contains(name)))
    }

    fn call_blocking(
        &self,
        module: &ModuleId,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
    ) -> Result<CallOutput, CallError> {
        if self.suspendable(grant) {
            let suspend = workers::inert_suspend();
            return workers::block_on(
                self.call_suspendable(module, function, input, grant, ctx, suspend),
            );
        }
        let started = std::time::Instant::now();
        let result = self.run(module, function, input, grant, ctx, started);
        self.account(module, function, ctx, started, result)
    }

    /// A call that may wait (see `suspendable`), on the worker thread that runs it.
    async fn call_suspendable(
        &self,
        module: &ModuleId,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
        suspend: executor::Suspend,
    ) -> Result<CallOutput, CallError> {
        let started = std::time::Instant::now();
        let result = self
            .run_suspendable(module, function, input, grant, ctx, started, suspend)
            .await;
        self.account(module, function, ctx, started, result)
    }

    /// Records a finished call's time and outcome.
    fn account(
        &self,
        module: &ModuleId,
        function: &str,
        ctx: &CallContext,
        started: std::time::Instant,
        mut result: Result<CallOutput, CallError>,
    ) -> Result<CallOutput, CallError> {
        let elapsed = started.elapsed();
        self.shard().record(elapsed);
        if let Ok(out) = &mut result {
            out.duration = elapsed;
        }
        if let Err(error) = &result {
            self.count_error(error);
            // The error may carry the guest's own text: escaped, as guest log lines are.
            let error_text = error.to_string();
            tracing::debug!(%module, function, tenant = %ctx.tenant, code = %error.code(), "call failed: {}", error_text.escape_debug());
        }
        result
    }

    /// Drops every warm instance of these modules, in every shard.
    fn drop_pools(&self, modules: &[ModuleId]) {
        for shard in &self.shards {
            let mut pools = shard.pools_mut();
            for id in modules {
                pools.remove(id);
            }
        }
    }

    /// Forgets a module no tenant has any more: its code in memory, its instances and
    /// its compiled artifact on disk.
    fn forget(&self, id: &ModuleId) {
        for metered in [false, true] {
            self.code.remove(&(*id, metered));
            if let Some(path) = self.cache_path(id, metered)
                && let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(module = %id, path = %path.display(), "could not remove compiled artifact: {e}");
            }
        }
        self.drop_pools(std::slice::from_ref(id));
    }

    fn runtime(&self, metered: bool) -> &Runtime {
        &self.runtimes[usize::from(metered)]
    }

    fn count_error(&self, error: &CallError) {
        self.stats.call_errors.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .errors_by_code
            .lock()
            .entry(error.code())
            .or_default() += 1;
    }

    /// This thread's shard.
    fn shard(&self) -> &Shard {
        &self.shards[thread_slot() % self.shards.len()]
    }

    /// A call's pool, after the checks every call passes, with a warm instance if one is
    /// idle.
    fn checkout(
        &self,
        module: &ModuleId,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
        started: std::time::Instant,
    ) -> Result<(Arc<InstancePool>, Option<Instance>), CallError> {
        self.admit(input, grant)?;
        let pool = self.pool_for(module, grant, ctx, started)?;
        // A replay runs on a fresh instance, and leaves it (its state is not live state).
        let idle = if replaying(ctx) {
            None
        } else {
            pool.idle.lock().pop()
        };
        Ok((pool, idle))
    }

    /// The checks every call passes before it takes an instance.
    fn admit(&self, input: &[u8], grant: &Grant) -> Result<(), CallError> {
        if grant.memory_bytes > self.max_memory_bytes {
            return Err(CallError::GrantInvalid {
                reason: format!(
                    "memory_bytes {} is over this engine's maximum of {}",
                    grant.memory_bytes, self.max_memory_bytes
                ),
            });
        }
        if input.len() as u64 > grant.max_input_bytes {
            return Err(CallError::InputTooLarge {
                size: input.len() as u64,
                limit: grant.max_input_bytes,
            });
        }
        Ok(())
    }

    fn run(
        &self,
        module: &ModuleId,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
        started: std::time::Instant,
    ) -> Result<CallOutput, CallError> {
        let (pool, idle) = self.checkout(module, input, grant, ctx, started)?;
        let mut instance = match idle {
            Some(instance) => instance,
            None => self.instantiate(&pool, grant, ctx)?,
        };
        let result = instance.call(function, input, grant, ctx, started);
        self.give_back(&pool, instance, &result, ctx);
        result
    }

    /// [`run`](Self::run) with `call_async`. A call abandoned while it waits drops its
    /// instance with it (an instance is never reused mid-call).
    #[allow(clippy::too_many_arguments)]
    async fn run_suspendable(
        &self,
        module: &ModuleId,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
        started: std::time::Instant,
        suspend: executor::Suspend,
    ) -> Result<CallOutput, CallError> {
        let (pool, idle) = self.checkout(module, input, grant, ctx, started)?;
        let mut instance = match idle {
            Some(instance) => instance,
            None => {
                let prepare = |call: &mut executor::CallState| {
                    call.time_slice = self.time_slice;
                };
                let created = Instance::new_async(
                    &pool.pre,
                    grant,
                    self.log_level,
                    ctx,
                    self.http.clone(),
                    prepare,
                )
                .await?;
                self.stats.instances_created.fetch_add(1, Ordering::Relaxed);
                created
            }
        };
        instance.set_suspend(Some(suspend));
        let result = instance
            .call_async(function, input, grant, ctx, started)
            .await;
        instance.set_suspend(None);
        self.give_back(&pool, instance, &result, ctx);
        result
    }
}
