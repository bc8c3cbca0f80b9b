//! The executor: Extism plug-ins run directly on wasmtime, one [`Instance`] at a time.
//!
//! This is our own implementation of the Extism host ABI (`docs/extism-abi.md`): the env
//! functions live in [`abi`], Extism memory in [`memory`], and this file holds what one
//! instance is (a store with its [`StoreData`]) and how one call runs and fails. It knows
//! nothing of pools, threads, registries or disks; the engine builds on it.
//!
//! Limits: time and cancellation by an engine-wide epoch ticker plus a per-store check
//! (each store looks only at its own deadline and cancel flag, so one call's timeout
//! never touches another call); fuel per call; a memory budget per instance that covers
//! guest linear memory and Extism memory alike.

pub(crate) mod abi;
pub(crate) mod http;
mod instance;
mod logs;
pub mod memory;
mod user;
pub(crate) mod wasi;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::{Config, InstanceAllocationStrategy, Linker, PoolingAllocationConfig};

use crate::error::CallError;
use crate::host::{CallContext, HostFunction};
pub(crate) use instance::Instance;
use logs::CallLogs;
pub use logs::{LogLevel, LogLine};
use memory::{ExtismMemory, GrowthBudget, PAGE_SIZE};

pub(crate) const ENV: &str = "extism:host/env";
pub(crate) const USER: &str = "extism:host/user";
pub(crate) const WASI_P1: &str = "wasi_snapshot_preview1";

/// The fiber stack of a suspendable call: wasmtime's default wasm stack (512 KiB) plus
/// room for host frames.
const ASYNC_STACK_BYTES: usize = 1 << 20;

/// How often the engine-wide epoch advances; the resolution of deadlines and cancels.
const EPOCH_TICK: Duration = Duration::from_millis(2);

/// A call failure raised from inside wasm execution (host function, limiter, epoch
/// callback) and recovered intact after the call returns.
#[derive(Debug)]
pub(crate) struct Abort(pub CallError);

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Abort {}

/// The memory budget of one instance, charged by linear-memory growth (through
/// wasmtime's `ResourceLimiter`) and by Extism-memory growth (through `GrowthBudget`).
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    limit: u64,
    used: u64,
    /// The most bytes the instance's vars have held: vars live on the host, so their
    /// growth is charged here as the guest's own memory is.
    vars_high_water: u64,
}

impl MemoryBudget {
    /// Charges vars growing to `bytes` in all, beyond their high-water mark.
    pub(crate) fn charge_vars(&mut self, bytes: u64) -> Result<(), Abort> {
        if bytes > self.vars_high_water {
            self.charge(bytes - self.vars_high_water)?;
            self.vars_high_water = bytes;
        }
        Ok(())
    }

    fn charge(&mut self, bytes: u64) -> Result<(), Abort> {
        let used = self.used.saturating_add(bytes);
        if used > self.limit {
            return Err(Abort(CallError::MemoryLimit {
                limit_bytes: self.limit,
            }));
        }
        self.used = used;
        Ok(())
    }
}

impl wasmtime::ResourceLimiter for MemoryBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        self.charge((desired - current) as u64)?;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }
}

impl GrowthBudget for MemoryBudget {
    type Error = wasmtime::Error;

    fn grow(&mut self, pages: u64) -> Result<(), Self::Error> {
        Ok(self.charge(pages.saturating_mul(PAGE_SIZE))?)
    }
}

/// What the current call brings: who it runs for, its config, its deadline, its logs.
#[derive(Debug, Default)]
pub(crate) struct CallState {
    pub ctx: CallContext,
    pub config: BTreeMap<String, String>,
    pub allowed_hosts: Vec<String>,
    pub max_http_response_bytes: u64,
    /// Status and headers of the call's last `http_request`.
    pub http_status: u16,
    pub http_headers: BTreeMap<String, String>,
    deadline: Option<Instant>,
    timeout: Duration,
    logs: CallLogs,
    /// Run with `call_async`: the call may yield its thread (an async host function's
    /// wait, the end of a time slice).
    pub(crate) is_async: bool,
    /// Cooperative time slicing of async calls: yield after running this long.
    pub(crate) time_slice: Option<Duration>,
    slice_ends: Option<Instant>,
    /// Tells the engine's scheduler that the call waits (and no longer holds a worker).
    pub(crate) suspend: Option<Suspend>,
}

/// Marks the current call as waiting on an async host function; the returned guard marks
/// it running again when dropped. `None` when the scheduler keeps it counted as running.
#[derive(Clone)]
pub(crate) struct Suspend(
    pub Arc<dyn Fn() -> Option<Box<dyn std::any::Any + Send>> + Send + Sync + 'static>,
);

impl std::fmt::Debug for Suspend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Suspend")
    }
}

impl CallState {
    /// Time left before the call's deadline.
    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.map_or(self.timeout, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// Everything a store holds besides wasm state.
#[derive(Debug)]
pub(crate) struct StoreData {
    pub memory: ExtismMemory,
    pub budget: MemoryBudget,
    /// Extism vars: per instance, across calls.
    pub vars: BTreeMap<String, Vec<u8>>,
    pub max_var_bytes: u64,
    pub log_level: LogLevel,
    pub call: CallState,
    /// The engine's outbound HTTP client (made on first use).
    pub http: Arc<http::Outbound>,
    /// WASI, when the grant allows it.
    pub wasi: Option<wasi::WasiState>,
}

impl StoreData {
    /// The WASI context for WASI imports. Modules import WASI only under a grant that
    /// allows it (the engine refuses them otherwise), so the empty context, which can
    /// reach nothing, is never really used.
    fn wasi_ctx(&mut self) -> &mut wasi_common::WasiCtx {
        &mut self
            .wasi
            .get_or_insert_with(|| wasi::WasiState {
                ctx: wasi_common::sync::WasiCtxBuilder::new().build(),
                stdout: wasi::Captured::default(),
                stderr: wasi::Captured::default(),
            })
            .ctx
    }

    /// Moves what the guest wrote to stdout (as info) and stderr (as warnings) into
    /// the call's logs, a line each.
    fn collect_wasi_output(&mut self) {
        let Some(state) = &self.wasi else {
            return;
        };
        let streams = [
            (LogLevel::Info, state.stdout.take()),
            (LogLevel::Warn, state.stderr.take()),
        ];
        for (level, (bytes, truncated)) in streams {
            for line in String::from_utf8_lossy(&bytes).lines() {
                self.push_log(level, line.to_owned());
            }
            if truncated {
                self.push_log(
                    LogLevel::Warn,
                    format!("(output over {} bytes dropped)", wasi::MAX_CAPTURED_BYTES),
                );
            }
        }
    }

    pub(crate) fn push_log(&mut self, level: LogLevel, message: String) {
        let call = &mut self.call;
        call.logs.push(&call.ctx.tenant, level, message);
    }
}

/// Engine-wide settings of the executor.
#[derive(Debug, Clone)]
pub(crate) struct ExecutorLimits {
    /// Live instances the pooling allocator makes room for.
    pub max_instances: u32,
    /// The largest linear memory any grant may ask for.
    pub max_memory_bytes: u64,
}

/// The wasmtime configuration every Deadlift engine uses; `metered` turns fuel on.
pub(crate) fn wasmtime_config(limits: &ExecutorLimits, metered: bool) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(limits.max_instances)
        .total_memories(limits.max_instances)
        .total_tables(limits.max_instances)
        // A suspended call holds a fiber stack; one per live instance at most.
        .total_stacks(limits.max_instances)
        // A reused stack keeps its pages: faulting them in again costs more than the
        // call itself.
        .async_stack_keep_resident(ASYNC_STACK_BYTES)
        .max_memory_size(usize::try_from(limits.max_memory_bytes).unwrap_or(usize::MAX));
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .consume_fuel(metered)
        .wasm_tail_call(true)
        .wasm_function_references(true)
        // Fiber stacks of suspendable calls: guest stack plus host frames, pooled.
        .async_stack_size(ASYNC_STACK_BYTES)
        .cache(None)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// Advances the engine's epoch every tick until dropped.
#[derive(Debug)]
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engines: Vec<wasmtime::Engine>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("deadlift-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    for engine in &engines {
                        engine.increment_epoch();
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Builds the linker: every env function, and every embedder host function.
/// The blocking linker's I/O functions wait on their thread; the suspendable one's
/// (`http_request` and async host functions) wait without holding a worker, and only
/// `call_async` can run them.
pub(crate) fn linker(
    engine: &wasmtime::Engine,
    host_functions: &[HostFunction],
    runtime: Option<&tokio::runtime::Handle>,
    suspendable: bool,
) -> wasmtime::Result<Linker<StoreData>> {
    let mut linker = Linker::new(engine);
    abi::define_env(&mut linker, suspendable)?;
    wasi_common::sync::add_to_linker(&mut linker, StoreData::wasi_ctx)?;
    for function in host_functions {
        user::define_user(&mut linker, function, runtime, suspendable)?;
    }
    Ok(linker)
}

/// The result of a successful call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallOutput {
    /// The bytes the guest set as its output.
    pub output: Vec<u8>,
    /// What the guest logged, in order (within the grant's caps, then a line saying
    /// how many were dropped).
    pub logs: Vec<LogLine>,
    /// Log lines dropped over the grant's caps.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub logs_dropped: u64,
    /// Instructions consumed (Wasmtime fuel units).
    pub fuel_used: u64,
    #[serde(with = "duration_us", rename = "duration_us")]
    pub duration: Duration,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

mod duration_us {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_micros)
    }
}
