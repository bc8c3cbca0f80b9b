//! Compiled modules: from memory, else from the on-disk cache under
//! `<data_dir>/compiled/<compatibility key>/`, else by compiling (then caching). The
//! one `unsafe` block of the crate (`load_artifact`) reads only artifacts this code
//! wrote.
//!
//! Compiled code in memory is bounded: [`CodeCache`] keeps it under a byte budget and,
//! when over, drops the modules not used since the last sweep (the CLOCK approximation
//! of least-recently-used: a call only sets a flag, so the hot path takes no lock). A
//! dropped module is reloaded from the disk cache at its next call. Compiling is gated
//! by [`CompileGate`]: a few compiles at once across the engine, one per tenant.

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use sha2::{Digest, Sha256};
use wasmtime::Module;

use super::Inner;
use crate::executor::{USER, WASI_P1};
use crate::registry::{ModuleError, ModuleId};

/// A directory name that changes whenever compiled code would be incompatible: another
/// wasmtime version, another target or other compilation settings.
pub(super) fn compatibility_key(engine: &wasmtime::Engine) -> String {
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut hasher = Sha(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    hex::encode(&hasher.0.finalize()[..12])
}

/// A compiled module ready to be instantiated.
pub(super) struct Compiled {
    pub(super) module: Module,
    /// `extism:host/user` and WASI imports, checked against each grant.
    pub(super) user_imports: Vec<String>,
    pub(super) wasi_imports: Vec<String>,
    /// What keeping it in memory is reckoned to cost (its code image and the
    /// bookkeeping around it).
    pub(super) size: u64,
    /// Set by every call; cleared by the cache's sweep (see the module comment).
    used: AtomicBool,
}

impl Compiled {
    /// Marks the module used; cheap enough for every call (a read, rarely a write).
    pub(super) fn touch(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }
}

/// What a compiled module is reckoned to cost beyond its code image: wasmtime's
/// metadata, the import lists, the map entry (measured with `benches/density.rs`).
const PER_MODULE_OVERHEAD: u64 = 16 * 1024;

/// A module compiled for one of the two runtimes (plain, metered).
pub(super) type CodeKey = (ModuleId, bool);

/// Compiled modules in memory, under a byte budget.
pub(super) struct CodeCache {
    budget: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    modules: HashMap<CodeKey, Arc<Compiled>>,
    /// The sweep's order: oldest insertion first, second chances to the back.
    ring: VecDeque<CodeKey>,
    bytes: u64,
}

impl CodeCache {
    pub(super) fn new(budget: u64) -> Self {
        Self {
            budget,
            state: Mutex::new(CacheState::default()),
        }
    }

    pub(super) fn get(&self, id: &CodeKey) -> Option<Arc<Compiled>> {
        self.state.lock().modules.get(id).cloned()
    }

    /// Keeps `compiled`; returns the modules dropped to stay under the budget (never
    /// the one just kept), whose warm instances the caller drops too.
    pub(super) fn insert(&self, id: CodeKey, compiled: Arc<Compiled>) -> Vec<CodeKey> {
        let mut state = self.state.lock();
        if let Some(old) = state.modules.insert(id, compiled.clone()) {
            state.bytes -= old.size;
        } else {
            state.ring.push_back(id);
        }
        state.bytes += compiled.size;
        compiled.touch();
        let mut evicted = Vec::new();
        if state.bytes <= self.budget {
            return evicted;
        }
        // Sweep down to 90% of the budget, so that the next few inserts do not sweep.
        let target = self.budget / 10 * 9;
        let mut visits = state.ring.len() * 2;
        while state.bytes > target && visits > 0 {
            visits -= 1;
            let Some(candidate) = state.ring.pop_front() else {
                break;
            };
            let Some(entry) = state.modules.get(&candidate) else {
                continue;
            };
            if candidate == id || entry.used.swap(false, Ordering::Relaxed) {
                state.ring.push_back(candidate);
                continue;
            }
            if let Some(entry) = state.modules.remove(&candidate) {
                state.bytes -= entry.size;
                evicted.push(candidate);
            }
        }
        evicted
    }

    /// Forgets a module (deleted by its last owner).
    pub(super) fn remove(&self, id: &CodeKey) -> bool {
        let mut state = self.state.lock();
        let Some(entry) = state.modules.remove(id) else {
            return false;
        };
        state.bytes -= entry.size;
        state.ring.retain(|other| other != id);
        true
    }

    /// Bytes reckoned to be held, and modules held.
    pub(super) fn usage(&self) -> (u64, u64) {
        let state = self.state.lock();
        (state.bytes, state.modules.len() as u64)
    }
}

/// Bounds compiling: at most `slots` compiles at once in the engine, and one per tenant
/// (a tenant's second concurrent upload is refused, not queued behind its first).
pub(super) struct CompileGate {
    slots: usize,
    max_wait: Duration,
    state: Mutex<GateState>,
    freed: Condvar,
}

/// Compiles that may wait at once, across the engine and per tenant: each waiter holds
/// a thread and its module's bytes, so a flood of uploads is refused, not parked.
const MAX_WAITERS: usize = 64;
const MAX_TENANT_WAITERS: usize = 8;

#[derive(Default)]
struct GateState {
    running: usize,
    tenants: std::collections::HashSet<String>,
    waiting: usize,
    tenant_waiting: HashMap<String, usize>,
}

impl GateState {
    /// Counts one more waiter (of `tenant`), or refuses when too many wait already.
    fn start_waiting(&mut self, tenant: Option<&str>) -> Result<(), ModuleError> {
        if self.waiting >= MAX_WAITERS {
            return Err(ModuleError::CompilerBusy {
                waited: Duration::ZERO,
            });
        }
        if let Some(tenant) = tenant {
            let waiting = self.tenant_waiting.entry(tenant.to_owned()).or_default();
            if *waiting >= MAX_TENANT_WAITERS {
                return Err(ModuleError::TenantCompiling {
                    tenant: tenant.to_owned(),
                });
            }
            *waiting += 1;
        }
        self.waiting += 1;
        Ok(())
    }

    fn stop_waiting(&mut self, tenant: Option<&str>) {
        self.waiting -= 1;
        if let Some(tenant) = tenant
            && let Some(waiting) = self.tenant_waiting.get_mut(tenant)
        {
            *waiting -= 1;
            if *waiting == 0 {
                self.tenant_waiting.remove(tenant);
            }
        }
    }
}

/// A compile slot; released when dropped.
pub(super) struct CompileSlot<'a> {
    gate: &'a CompileGate,
    tenant: Option<String>,
}

impl Drop for CompileSlot<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock();
        state.running -= 1;
        if let Some(tenant) = self.tenant.take() {
            state.tenants.remove(&tenant);
        }
        // Waiters wait on different conditions (a slot, their tenant's slot): wake all.
        self.gate.freed.notify_all();
    }
}

impl CompileGate {
    pub(super) fn new(slots: usize, max_wait: Duration) -> Self {
        Self {
            slots: slots.max(1),
            max_wait,
            state: Mutex::new(GateState::default()),
            freed: Condvar::new(),
        }
    }

    /// Waits (up to the bound) for a slot and, with a tenant, for that tenant's one
    /// slot: a tenant's compiles run one after another, so it never holds more than one
    /// of the engine's slots.
    pub(super) fn enter(&self, tenant: Option<&str>) -> Result<CompileSlot<'_>, ModuleError> {
        let mut state = self.state.lock();
        let deadline = std::time::Instant::now() + self.max_wait;
        let free = |state: &GateState| {
            !tenant.is_some_and(|t| state.tenants.contains(t)) && state.running < self.slots
        };
        if !free(&state) {
            state.start_waiting(tenant)?;
            let mut timed_out = false;
            while !free(&state) && !timed_out {
                timed_out = self.freed.wait_until(&mut state, deadline).timed_out();
            }
            state.stop_waiting(tenant);
            if !free(&state) {
                return Err(match tenant {
                    Some(t) if state.tenants.contains(t) => ModuleError::TenantCompiling {
                        tenant: t.to_owned(),
                    },
                    _ => ModuleError::CompilerBusy {
                        waited: self.max_wait,
                    },
                });
            }
        }
        state.running += 1;
        if let Some(tenant) = tenant {
            state.tenants.insert(tenant.to_owned());
        }
        Ok(CompileSlot {
            gate: self,
            tenant: tenant.map(str::to_owned),
        })
    }
}

impl Inner {
    /// The compiled form of a module: from memory, else from the disk cache, else by
    /// compiling (and then caching) it. Compiling takes a slot of the compile gate; with
    /// `tenant` (an upload), also that tenant's one slot.
    pub(super) fn compiled(
        &self,
        id: &ModuleId,
        bytes: &[u8],
        tenant: Option<&str>,
        metered: bool,
    ) -> Result<Arc<Compiled>, ModuleError> {
        let key = (*id, metered);
        if let Some(compiled) = self.code.get(&key) {
            return Ok(compiled);
        }
        let module = match self.load_cached(id, metered) {
            Some(module) => module,
            None => {
                let _slot = self.compile_gate.enter(tenant)?;
                // Another call may have compiled it while this one waited.
                if let Some(compiled) = self.code.get(&key) {
                    return Ok(compiled);
                }
                let module = Module::new(&self.runtime(metered).wasmtime, bytes).map_err(|e| {
                    ModuleError::Compile {
                        reason: format!("{e:#}"),
                    }
                })?;
                self.stats.compiled.fetch_add(1, Ordering::Relaxed);
                tracing::info!(module = %id, metered, "compiled module");
                self.store_cached(id, metered, &module);
                module
            }
        };
        let imports_from = |namespace: &str| {
            module
                .imports()
                .filter(|i| i.module() == namespace)
                .map(|i| i.name().to_owned())
                .collect()
        };
        let image = module.image_range();
        let compiled = Arc::new(Compiled {
            user_imports: imports_from(USER),
            wasi_imports: imports_from(WASI_P1),
            size: (image.end as usize).saturating_sub(image.start as usize) as u64
                + PER_MODULE_OVERHEAD,
            used: AtomicBool::new(true),
            module,
        });
        let evicted = self.code.insert(key, compiled.clone());
        if !evicted.is_empty() {
            let ids: Vec<ModuleId> = evicted.iter().map(|(id, _)| *id).collect();
            self.drop_pools(&ids);
            self.stats
                .code_evicted
                .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        }
        Ok(compiled)
    }

    pub(super) fn cache_path(&self, id: &ModuleId, metered: bool) -> Option<PathBuf> {
        let dir = self.runtime(metered).cache_dir.as_ref()?;
        Some(dir.join(format!("{}.cwasm", id.hex())))
    }

    pub(super) fn load_cached(&self, id: &ModuleId, metered: bool) -> Option<Module> {
        let path = self.cache_path(id, metered)?;
        if !path.exists() {
            return None;
        }
        match load_artifact(&self.runtime(metered).wasmtime, &path) {
            Ok(module) => {
                self.stats.loaded_from_cache.fetch_add(1, Ordering::Relaxed);
                tracing::info!(module = %id, "loaded compiled module from cache");
                Some(module)
            }
            Err(e) => {
                tracing::warn!(module = %id, path = %path.display(), "ignoring unusable compiled artifact: {e:#}");
                None
            }
        }
    }

    pub(super) fn store_cached(&self, id: &ModuleId, metered: bool, module: &Module) {
        let Some(path) = self.cache_path(id, metered) else {
            return;
        };
        let written = module.serialize().and_then(|bytes| {
            // Write then rename, so a crash never leaves a torn artifact under the name.
            let temp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&temp, bytes)?;
            std::fs::rename(&temp, &path)?;
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!(module = %id, "could not cache compiled module: {e:#}");
        }
    }
}

/// Loads a compiled artifact this engine wrote.
#[allow(unsafe_code)]
fn load_artifact(engine: &wasmtime::Engine, path: &Path) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime requires that the file be an artifact it produced, since it maps it
    // as executable code. Only `store_cached` writes into the cache directory (under the
    // agent's own data directory, by atomic rename), and the directory's name changes
    // with every wasmtime version and setting that affects compiled code; wasmtime
    // further checks the artifact's header and compatibility before using it.
    unsafe { Module::deserialize_file(engine, path) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: uploads compiled on every core at once, without a per-tenant limit. A
    /// tenant's second compile waits for its first; others wait for a slot; both only
    /// up to the bound.
    #[test]
    fn the_compile_gate_allows_one_compile_per_tenant_and_bounds_the_rest() {
        let gate = CompileGate::new(1, Duration::from_millis(20));
        let held = gate.enter(Some("acme")).unwrap();
        assert!(matches!(
            gate.enter(Some("acme")),
            Err(ModuleError::TenantCompiling { .. })
        ));
        assert!(matches!(
            gate.enter(Some("other")),
            Err(ModuleError::CompilerBusy { .. })
        ));
        drop(held);
        let again = gate.enter(Some("acme")).unwrap();
        drop(again);
        // A call's compile (no tenant slot) waits for the engine's slot only.
        let _call = gate.enter(None).unwrap();
    }

    /// Each waiting upload holds a thread and its bytes: one tenant's flood of uploads
    /// is refused beyond a few waiters instead of parking the blocking pool.
    #[test]
    fn too_many_waiting_compiles_are_refused_at_once() {
        let gate = std::sync::Arc::new(CompileGate::new(1, Duration::from_secs(30)));
        let held = gate.enter(Some("acme")).unwrap();
        let waiters: Vec<_> = (0..MAX_TENANT_WAITERS)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || gate.enter(Some("acme")).map(drop))
            })
            .collect();
        while gate.state.lock().waiting < MAX_TENANT_WAITERS {
            std::thread::yield_now();
        }
        let started = std::time::Instant::now();
        assert!(matches!(
            gate.enter(Some("acme")),
            Err(ModuleError::TenantCompiling { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(30), "it waited");
        drop(held);
        for waiter in waiters {
            waiter.join().unwrap().unwrap();
        }
        assert_eq!(gate.state.lock().waiting, 0);
        assert!(gate.state.lock().tenant_waiting.is_empty());
    }

    #[test]
    fn the_code_cache_sweeps_modules_not_used_since_the_last_sweep() {
        let engine = wasmtime::Engine::default();
        let module = Module::new(&engine, "(module)").unwrap();
        let entry = |size| {
            Arc::new(Compiled {
                module: module.clone(),
                user_imports: Vec::new(),
                wasi_imports: Vec::new(),
                size,
                used: AtomicBool::new(false),
            })
        };
        let id = |n: u8| (ModuleId::of(&[n]), false);
        let cache = CodeCache::new(100);
        let second = entry(30);
        assert!(cache.insert(id(1), entry(30)).is_empty());
        assert!(cache.insert(id(2), second.clone()).is_empty());
        assert!(cache.insert(id(3), entry(30)).is_empty());
        // Over budget: the sweep clears every mark, then drops the oldest.
        assert_eq!(cache.insert(id(4), entry(30)), [id(1)]);
        // Module 2 is used again; 3 is not: 3 goes, although 2 is older.
        second.touch();
        assert_eq!(cache.insert(id(5), entry(30)), [id(3)]);
        assert!(cache.usage().0 <= 100);
    }
}
