//! Building an engine: [`EngineBuilder`] with its settings and their defaults, and the
//! two wasmtime [`Runtime`]s (plain and metered) each engine holds.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::Linker;

use super::compiled::{CodeCache, CompileGate, compatibility_key};
use super::shard::{Counters, Shard};
use super::workers::{Fairness, WorkerPool};
use super::{Engine, Inner};
use crate::executor::{self, EpochTicker, ExecutorLimits, LogLevel, StoreData};
use crate::host::{self, EventSink, HostFunction, KvStore, MemoryKv, MemorySink};
use crate::registry::{MemoryModuleStore, ModuleStore, Registry};

/// Failures building an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("wasm runtime setup failed: {0}")]
    Runtime(String),
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("host function `{0}` is registered twice")]
    DuplicateHostFunction(String),
    #[error("cannot start engine threads: {0}")]
    Threads(std::io::Error),
}

/// Builds an [`Engine`]. Every setting has a default that suits one machine.
pub struct EngineBuilder {
    data_dir: Option<PathBuf>,
    workers: usize,
    tenant_in_flight: Option<usize>,
    tenant_queue: Option<usize>,
    tenant_queue_bytes: Option<usize>,
    max_queue_wait: Option<std::time::Duration>,
    tenant_suspended: Option<usize>,
    max_suspended: Option<usize>,
    time_slice: Option<std::time::Duration>,
    max_instances: u32,
    max_memory_bytes: u64,
    max_idle_per_pool: usize,
    module_cache_bytes: u64,
    max_module_bytes: u64,
    compile_slots: usize,
    log_level: LogLevel,
    kv: Option<Arc<dyn KvStore>>,
    sink: Option<Arc<dyn EventSink>>,
    modules: Option<Arc<dyn ModuleStore>>,
    host_functions: Vec<HostFunction>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("data_dir", &self.data_dir)
            .field("workers", &self.workers)
            .field("max_instances", &self.max_instances)
            .finish_non_exhaustive()
    }
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self {
            data_dir: None,
            // One more than the cores: the spare is kept for tenants with nothing
            // running (see `workers.rs`).
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()) + 1,
            tenant_in_flight: None,
            tenant_queue: None,
            tenant_queue_bytes: None,
            max_queue_wait: None,
            tenant_suspended: None,
            max_suspended: None,
            time_slice: None,
            max_instances: 256,
            max_memory_bytes: 512 * 1024 * 1024,
            max_idle_per_pool: 8,
            module_cache_bytes: 256 * 1024 * 1024,
            max_module_bytes: 8 * 1024 * 1024,
            compile_slots: 1,
            log_level: LogLevel::Info,
            kv: None,
            sink: None,
            modules: None,
            host_functions: Vec::new(),
        }
    }
}

impl EngineBuilder {
    /// Where compiled modules are cached (`<dir>/compiled/...`). Without it, every start
    /// compiles every module again.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Threads that run calls for the async API (default: the cores, plus one kept for
    /// tenants with nothing running).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// How calls are shared out between tenants, all at once.
    pub fn fairness(self, fairness: Fairness) -> Self {
        self.tenant_in_flight(fairness.tenant_in_flight)
            .tenant_queue(fairness.tenant_queue)
            .tenant_queue_bytes(fairness.tenant_queue_bytes)
            .max_queue_wait(fairness.max_queue_wait)
    }

    /// Calls of one tenant running at once (default: every worker; while it has one
    /// running, a tenant never takes the last free worker).
    pub fn tenant_in_flight(mut self, calls: usize) -> Self {
        self.tenant_in_flight = Some(calls.max(1));
        self
    }

    /// Calls of one tenant waiting at once; more are shed (default 1,024).
    pub fn tenant_queue(mut self, calls: usize) -> Self {
        self.tenant_queue = Some(calls);
        self
    }

    /// Input bytes of one tenant's waiting calls; beyond, calls are shed (default 64 MiB).
    pub fn tenant_queue_bytes(mut self, bytes: usize) -> Self {
        self.tenant_queue_bytes = Some(bytes);
        self
    }

    /// A call that waited this long for a worker is shed (default 2 s).
    pub fn max_queue_wait(mut self, wait: std::time::Duration) -> Self {
        self.max_queue_wait = Some(wait);
        self
    }

    /// Calls of one tenant that may wait on async host functions at once without
    /// holding a worker (default 1,024).
    pub fn tenant_suspended(mut self, calls: usize) -> Self {
        self.tenant_suspended = Some(calls);
        self
    }

    /// Calls that may wait on async host functions at once, across tenants, without
    /// holding a worker (default 4,096; each also holds an instance, so `max_instances`
    /// bounds them too).
    pub fn max_suspended(mut self, calls: usize) -> Self {
        self.max_suspended = Some(calls);
        self
    }

    /// Cooperative time slicing: every call runs suspendable and gives its worker to
    /// other calls after running this long (checked at epoch ticks, every 2 ms). Off by
    /// default: it costs every call a fiber (see BENCHMARKS.md).
    pub fn time_slice(mut self, slice: Option<std::time::Duration>) -> Self {
        self.time_slice = slice;
        self
    }

    /// Live instances (warm and running) the engine makes room for, across all modules.
    pub fn max_instances(mut self, max: u32) -> Self {
        self.max_instances = max.max(1);
        self
    }

    /// The largest memory budget any grant may ask for.
    pub fn max_memory_bytes(mut self, bytes: u64) -> Self {
        self.max_memory_bytes = bytes;
        self
    }

    /// Warm instances kept per (module, tenant, grant shape) in each thread's shard
    /// (there is one shard per worker; other threads share them).
    pub fn max_idle_per_pool(mut self, max: usize) -> Self {
        self.max_idle_per_pool = max;
        self
    }

    /// Compiled code kept in memory, in bytes (default 256 MiB); beyond it the modules
    /// least recently used are dropped and reloaded from the disk cache when called.
    pub fn module_cache_bytes(mut self, bytes: u64) -> Self {
        self.module_cache_bytes = bytes;
        self
    }

    /// The largest module accepted, in bytes (default 8 MiB): compile time and memory
    /// grow with size.
    pub fn max_module_bytes(mut self, bytes: u64) -> Self {
        self.max_module_bytes = bytes;
        self
    }

    /// Modules compiled at once across the engine (default 1); each tenant compiles one
    /// at a time.
    pub fn compile_slots(mut self, slots: usize) -> Self {
        self.compile_slots = slots.max(1);
        self
    }

    /// The lowest guest log level captured (and reported by `get_log_level`).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// Storage behind `kv_get`/`kv_set`/`kv_delete` (default: in memory).
    pub fn kv(mut self, kv: Arc<dyn KvStore>) -> Self {
        self.kv = Some(kv);
        self
    }

    /// Where `emit` publishes (default: kept in memory).
    pub fn events(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Storage of registered modules (default: in memory).
    pub fn modules(mut self, store: Arc<dyn ModuleStore>) -> Self {
        self.modules = Some(store);
        self
    }

    /// Offers a host function to plug-ins (subject to each call's grant).
    pub fn host_function(mut self, function: HostFunction) -> Self {
        self.host_functions.push(function);
        self
    }

    pub fn build(self) -> Result<Engine, EngineError> {
        let limits = ExecutorLimits {
            max_instances: self.max_instances,
            max_memory_bytes: self.max_memory_bytes,
        };

        let kv = self.kv.unwrap_or_else(|| Arc::new(MemoryKv::new()));
        let sink = self.sink.unwrap_or_else(|| Arc::new(MemorySink::new()));
        let mut functions = host::builtins(kv, sink);
        functions.extend(self.host_functions);
        let mut host_names = HashSet::new();
        for function in &functions {
            if !host_names.insert(function.name.clone()) {
                return Err(EngineError::DuplicateHostFunction(function.name.clone()));
            }
        }
        let async_host_names: HashSet<String> = functions
            .iter()
            .filter(|f| f.is_async())
            .map(|f| f.name.clone())
            .collect();
        // Async host functions' futures run on the runtime the engine is built in.
        let runtime = tokio::runtime::Handle::try_current().ok();
        if !async_host_names.is_empty() && runtime.is_none() {
            return Err(EngineError::Runtime(
                "async host functions need the engine to be built inside a Tokio runtime".into(),
            ));
        }
        let runtimes = [false, true].map(|metered| {
            Runtime::new(
                &limits,
                metered,
                &functions,
                runtime.as_ref(),
                self.data_dir.as_deref(),
            )
        });
        let [plain, metered] = runtimes;
        let runtimes = [plain?, metered?];
        let ticker = EpochTicker::start(runtimes.iter().map(|r| r.wasmtime.clone()).collect())
            .map_err(EngineError::Threads)?;
        let modules = self
            .modules
            .unwrap_or_else(|| Arc::new(MemoryModuleStore::new()));
        let inner = Arc::new(Inner {
            runtimes,
            host_names,
            http: Arc::default(),
            registry: Registry::new(modules),
            code: CodeCache::new(self.module_cache_bytes),
            compile_gate: CompileGate::new(self.compile_slots, std::time::Duration::from_secs(60)),
            max_module_bytes: self.max_module_bytes,
            shards: (0..self.workers).map(|_| Shard::default()).collect(),
            log_level: self.log_level,
            max_idle_per_pool: self.max_idle_per_pool,
            max_memory_bytes: self.max_memory_bytes,
            stats: Counters::default(),
            started: std::time::Instant::now(),
            async_host_names,
            time_slice: self.time_slice,
            _ticker: ticker,
        });
        let defaults = Fairness::for_workers(self.workers);
        let fairness = Fairness {
            tenant_in_flight: self.tenant_in_flight.unwrap_or(defaults.tenant_in_flight),
            tenant_queue: self.tenant_queue.unwrap_or(defaults.tenant_queue),
            tenant_queue_bytes: self
                .tenant_queue_bytes
                .unwrap_or(defaults.tenant_queue_bytes),
            max_queue_wait: self.max_queue_wait.unwrap_or(defaults.max_queue_wait),
            tenant_suspended: self.tenant_suspended.unwrap_or(defaults.tenant_suspended),
            max_suspended: self.max_suspended.unwrap_or(defaults.max_suspended),
        };
        let workers = WorkerPool::start(self.workers, fairness).map_err(EngineError::Threads)?;
        Ok(Engine { inner, workers })
    }
}

/// One wasmtime engine and what is made with it: its linker and its disk cache. There
/// are two, because fuel metering is a setting of the whole engine and costs about a
/// third of guest speed: grants with fuel run on the metered one, the others on the
/// plain one. A module is compiled for each only when a call needs it.
pub(super) struct Runtime {
    pub(super) wasmtime: wasmtime::Engine,
    /// For blocking calls.
    pub(super) linker: Linker<StoreData>,
    /// For suspendable calls (`call_async`).
    pub(super) suspendable_linker: Linker<StoreData>,
    pub(super) cache_dir: Option<PathBuf>,
}

impl Runtime {
    fn new(
        limits: &ExecutorLimits,
        metered: bool,
        functions: &[HostFunction],
        runtime: Option<&tokio::runtime::Handle>,
        data_dir: Option<&std::path::Path>,
    ) -> Result<Self, EngineError> {
        let wasmtime = wasmtime::Engine::new(&executor::wasmtime_config(limits, metered))
            .map_err(|e| EngineError::Runtime(format!("{e:#}")))?;
        let [linker, suspendable_linker] = [false, true].map(|suspendable| {
            executor::linker(&wasmtime, functions, runtime, suspendable)
                .map_err(|e| EngineError::Runtime(format!("{e:#}")))
        });
        let (linker, suspendable_linker) = (linker?, suspendable_linker?);
        let cache_dir = match data_dir {
            Some(dir) => {
                // The key differs between the two runtimes: their code differs.
                let path = dir.join("compiled").join(compatibility_key(&wasmtime));
                std::fs::create_dir_all(&path).map_err(|source| EngineError::DataDir {
                    path: path.clone(),
                    source,
                })?;
                Some(path)
            }
            None => None,
        };
        Ok(Self {
            wasmtime,
            linker,
            suspendable_linker,
            cache_dir,
        })
    }
}
