//! Warm instances: one [`InstancePool`] per (module, tenant, grant shape, suspendable)
//! in each shard, bound on first use (where ownership, imports and grants are checked),
//! instances made when none is idle, given back unless the call spoiled them, and the
//! least recently used dropped when instance slots run out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use wasmtime::InstancePre;

use super::compiled::Compiled;
use super::shard::Shard;
use super::{Inner, replaying};
use crate::error::CallError;
use crate::executor::{CallOutput, Instance, StoreData, WASI_P1};
use crate::grant::{Grant, InstanceShape};
use crate::host::CallContext;
use crate::registry::{ModuleError, ModuleId};

/// Warm instances of one module for one tenant and grant shape, in one shard.
pub(super) struct InstancePool {
    pub(super) tenant: String,
    pub(super) shape: InstanceShape,
    /// Kept for the code cache's use marks.
    pub(super) compiled: Arc<Compiled>,
    /// When a call last started here (µs since the engine started): which warm
    /// instances go first when slots run out.
    pub(super) last_used_us: AtomicU64,
    pub(super) pre: InstancePre<StoreData>,
    pub(super) idle: Mutex<Vec<Instance>>,
    /// Its instances run calls with `call_async` (`Inner::suspendable`).
    pub(super) suspendable: bool,
}

impl InstancePool {
    pub(super) fn serves(&self, tenant: &str, grant: &Grant, suspendable: bool) -> bool {
        self.tenant == tenant && self.shape.admits(grant) && self.suspendable == suspendable
    }
}

impl Inner {
    /// This thread's pool for the call, marked used now.
    pub(super) fn pool_for(
        &self,
        module: &ModuleId,
        grant: &Grant,
        ctx: &CallContext,
        started: std::time::Instant,
    ) -> Result<Arc<InstancePool>, CallError> {
        let pool = self.pool(self.shard(), module, grant, ctx)?;
        pool.compiled.touch();
        pool.last_used_us.store(
            u64::try_from(started.duration_since(self.started).as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(pool)
    }

    /// Gives a used instance back to its pool, unless the call spoiled it.
    pub(super) fn give_back(
        &self,
        pool: &InstancePool,
        instance: Instance,
        result: &Result<CallOutput, CallError>,
        ctx: &CallContext,
    ) {
        let keep = instance.reusable()
            && !replaying(ctx)
            && result.as_ref().err().is_none_or(|e| !e.poisons_instance());
        if keep {
            let mut idle = pool.idle.lock();
            if idle.len() < self.max_idle_per_pool {
                idle.push(instance);
            }
        } else {
            self.stats
                .instances_discarded
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn instantiate(
        &self,
        pool: &InstancePool,
        grant: &Grant,
        ctx: &CallContext,
    ) -> Result<Instance, CallError> {
        let created = match Instance::new(&pool.pre, grant, self.log_level, ctx, self.http.clone())
        {
            Err(CallError::Overloaded { .. }) => {
                // Every slot is taken: give up the least recently used warm instances
                // and try once more.
                self.evict_idle();
                Instance::new(&pool.pre, grant, self.log_level, ctx, self.http.clone())
            }
            other => other,
        }?;
        self.stats.instances_created.fetch_add(1, Ordering::Relaxed);
        Ok(created)
    }

    /// Drops the warm instances of the least recently used pools: at least half of all
    /// idle instances.
    pub(super) fn evict_idle(&self) {
        let mut pools: Vec<(u64, Arc<InstancePool>)> = Vec::new();
        let mut idle = 0;
        for shard in &self.shards {
            for pool in shard.pools().values().flatten() {
                let count = pool.idle.lock().len();
                if count > 0 {
                    idle += count;
                    pools.push((pool.last_used_us.load(Ordering::Relaxed), pool.clone()));
                }
            }
        }
        pools.sort_unstable_by_key(|(last_used, _)| *last_used);
        let mut dropped = 0;
        for (_, pool) in pools {
            if dropped * 2 >= idle {
                break;
            }
            let mut instances = pool.idle.lock();
            dropped += instances.len();
            instances.clear();
        }
    }

    /// The pool for this module, tenant and grant; binds it on first use, which is where
    /// ownership, imports and grants are checked.
    pub(super) fn pool(
        &self,
        shard: &Shard,
        module: &ModuleId,
        grant: &Grant,
        ctx: &CallContext,
    ) -> Result<Arc<InstancePool>, CallError> {
        let suspendable = self.suspendable(grant);
        let find = |pools: &HashMap<ModuleId, Vec<Arc<InstancePool>>>| {
            pools
                .get(module)?
                .iter()
                .find(|pool| pool.serves(&ctx.tenant, grant, suspendable))
                .cloned()
        };
        if let Some(pool) = find(&shard.pools()) {
            return Ok(pool);
        }
        let not_found = || CallError::ModuleNotFound {
            module: module.to_string(),
        };
        let registered = self
            .registry
            .get(&ctx.tenant, module)
            .map_err(|e| match e {
                ModuleError::NotFound { .. } => not_found(),
                other => CallError::Internal {
                    message: other.to_string(),
                },
            })?;
        let metered = grant.fuel.is_some();
        let cached = self.code.get(&(*module, metered));
        let compiled = match cached {
            Some(compiled) => compiled,
            None => {
                let bytes = self
                    .registry
                    .bytes(&registered.id)
                    .map_err(|_| not_found())?;
                self.compiled(module, &bytes, None, metered)
                    .map_err(|e| CallError::Internal {
                        message: e.to_string(),
                    })?
            }
        };
        for name in &compiled.user_imports {
            if !self.host_names.contains(name) {
                return Err(CallError::HostFunctionUnknown { name: name.clone() });
            }
            if !grant.host_functions.contains(name) {
                return Err(CallError::HostFunctionDenied { name: name.clone() });
            }
        }
        if let Some(name) = compiled.wasi_imports.first()
            && !grant.wasi
        {
            return Err(CallError::ImportDenied {
                module: WASI_P1.to_owned(),
                name: name.clone(),
                reason: "the grant does not allow WASI".to_owned(),
            });
        }
        let runtime = self.runtime(metered);
        let linker = if suspendable {
            &runtime.suspendable_linker
        } else {
            &runtime.linker
        };
        let pre = linker
            .instantiate_pre(&compiled.module)
            .map_err(|e| CallError::Link {
                message: format!("{e:#}"),
            })?;
        let mut pools = shard.pools_mut();
        if let Some(pool) = find(&pools) {
            return Ok(pool);
        }
        let pool = Arc::new(InstancePool {
            tenant: ctx.tenant.clone(),
            shape: grant.instance_shape(),
            compiled,
            last_used_us: AtomicU64::new(0),
            pre,
            idle: Mutex::new(Vec::new()),
            suspendable,
        });
        pools.entry(*module).or_default().push(pool.clone());
        Ok(pool)
    }
}
