//! Per-thread shards of the engine's state: each holds its thread's warm-instance pools
//! and per-call counters, so that warm calls on different threads share no lock or
//! counter. The counters of rare events, [`EngineStats`] (the sum, when asked), and the
//! call-duration histogram's buckets live here too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use super::pools::InstancePool;
use crate::code::Code;
use crate::registry::ModuleId;

/// Upper bounds (in microseconds) of the call-duration histogram buckets.
pub const DURATION_BUCKETS_US: [u64; 10] = [
    10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 1_000_000,
];

/// Counters of rare events behind [`EngineStats`]; per-call counters live in [`Shard`]s.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) compiled: AtomicU64,
    pub(super) code_evicted: AtomicU64,
    pub(super) loaded_from_cache: AtomicU64,
    pub(super) instances_created: AtomicU64,
    pub(super) instances_discarded: AtomicU64,
    pub(super) call_errors: AtomicU64,
    pub(super) errors_by_code: Mutex<BTreeMap<Code, u64>>,
}

/// One thread's pools and per-call counters. Each thread works in the shard its
/// [`thread_slot`] picks, so the hot path writes no cache line another core uses:
/// no shared lock, reference count or counter is touched by a warm call.
#[repr(align(128))]
#[derive(Default)]
pub(super) struct Shard {
    /// Warm-instance pools by module; few per module (one per tenant and grant shape).
    pub(super) pools: RwLock<HashMap<ModuleId, Vec<Arc<InstancePool>>>>,
    pub(super) calls: AtomicU64,
    /// Calls per duration bucket (the last slot counts those above every bound).
    pub(super) duration_buckets: [AtomicU64; DURATION_BUCKETS_US.len() + 1],
    pub(super) duration_sum_us: AtomicU64,
}

impl Shard {
    pub(super) fn record(&self, elapsed: std::time::Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = DURATION_BUCKETS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(DURATION_BUCKETS_US.len());
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    pub(super) fn pools(
        &self,
    ) -> parking_lot::RwLockReadGuard<'_, HashMap<ModuleId, Vec<Arc<InstancePool>>>> {
        self.pools.read()
    }

    pub(super) fn pools_mut(
        &self,
    ) -> parking_lot::RwLockWriteGuard<'_, HashMap<ModuleId, Vec<Arc<InstancePool>>>> {
        self.pools.write()
    }
}

/// A small number fixed per thread, spreading threads over shards.
pub(super) fn thread_slot() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local!(static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed));
    SLOT.with(|slot| *slot)
}

/// A snapshot of what the engine has done, for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Modules compiled from Wasm bytes.
    pub compiled: u64,
    /// Modules loaded from the on-disk compiled cache instead of compiling.
    pub loaded_from_cache: u64,
    pub instances_created: u64,
    /// Instances dropped after a trap, timeout, fuel or memory exhaustion, or `_start`.
    pub instances_discarded: u64,
    pub calls: u64,
    pub call_errors: u64,
    /// Warm instances waiting in pools right now.
    pub idle_instances: u64,
    /// Compiled modules dropped from memory to stay under the code cache's budget.
    pub code_evicted: u64,
    /// Compiled code held in memory (reckoned bytes) and the modules it belongs to.
    pub code_bytes: u64,
    pub code_modules: u64,
    /// Calls not run because their tenant's queue was full or waited too long.
    pub calls_shed: u64,
    /// Failed calls by `CallError::code`.
    pub errors_by_code: BTreeMap<Code, u64>,
    /// Calls per bucket of [`DURATION_BUCKETS_US`] (not cumulative; one extra slot for
    /// slower calls).
    pub duration_buckets: Vec<u64>,
    pub duration_sum_us: u64,
}
