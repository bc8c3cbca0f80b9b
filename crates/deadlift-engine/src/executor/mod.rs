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
mod logs;
pub mod memory;
pub(crate) mod wasi;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::{
    Config, InstanceAllocationStrategy, InstancePre, Linker, PoolingAllocationConfig, Store, Trap,
    TypedFunc, UpdateDeadline, ValType,
};

use crate::error::CallError;
use crate::grant::Grant;
use crate::host::{CallContext, HostFunction};
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

/// Pending once (waking itself at once), then ready: lets the worker poll others.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
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
        abi::define_user(&mut linker, function, runtime, suspendable)?;
    }
    Ok(linker)
}

/// How an instance is initialised: a Haskell reactor's `hs_init` (after `_initialize`
/// when there is one), or one unit function, or nothing.
enum Initialiser {
    Haskell {
        reactor: Option<TypedFunc<(), ()>>,
        hs_init: wasmtime::Func,
        results: usize,
    },
    Unit(Option<TypedFunc<(), ()>>),
}

/// `hs_init(argc, argv)` with no arguments.
const HS_INIT_ARGS: [wasmtime::Val; 2] = [wasmtime::Val::I32(0), wasmtime::Val::I32(0)];

/// A guest export the host may call: `() -> i32` (a return code) or `() -> ()`.
enum Export {
    Code(TypedFunc<(), i32>),
    Unit(TypedFunc<(), ()>),
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

/// One live instance of a module: a store, its wasm instance, and cached exports.
pub(crate) struct Instance {
    store: Store<StoreData>,
    instance: wasmtime::Instance,
    exports: HashMap<String, Export>,
    /// Set after `_start`, which may run only once per store.
    spent: bool,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("spent", &self.spent)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// A store for one instance, with its limiter and epoch callback.
    fn store(
        pre: &InstancePre<StoreData>,
        grant: &Grant,
        log_level: LogLevel,
        http: Arc<http::Outbound>,
    ) -> Result<Store<StoreData>, CallError> {
        let wasi = if grant.wasi {
            Some(wasi::context(grant)?)
        } else {
            None
        };
        let data = StoreData {
            http,
            wasi,
            memory: ExtismMemory::new(),
            budget: MemoryBudget {
                limit: grant.memory_bytes,
                used: 0,
                vars_high_water: 0,
            },
            vars: BTreeMap::new(),
            max_var_bytes: grant.max_var_bytes,
            log_level,
            call: CallState::default(),
        };
        let mut store = Store::new(pre.module().engine(), data);
        store.limiter(|data| &mut data.budget);
        store.epoch_deadline_callback(|mut store| {
            let call = &store.data().call;
            if call.ctx.cancel.is_cancelled() {
                return Err(wasmtime::Error::new(Abort(CallError::Cancelled)));
            }
            let now = Instant::now();
            if call.deadline.is_some_and(|deadline| now >= deadline) {
                return Err(wasmtime::Error::new(Abort(CallError::Timeout {
                    limit: call.timeout,
                })));
            }
            // An async call past its time slice lets its worker run others for a while.
            if call.is_async
                && let Some(slice) = call.time_slice
                && call.slice_ends.is_some_and(|ends| now >= ends)
            {
                // The call gives its place back for the yield, so that the worker takes
                // another call, and takes a place again when it runs on.
                let suspend = call.suspend.clone();
                store.data_mut().call.slice_ends = Some(now + slice);
                return Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(async move {
                        let waiting = suspend.and_then(|suspend| (suspend.0)());
                        YieldOnce(false).await;
                        drop(waiting);
                    }),
                ));
            }
            Ok(UpdateDeadline::Continue(1))
        });
        Ok(store)
    }

    /// Instantiates the module and runs its initialiser (`hs_init`, `__wasm_call_ctors`
    /// or `_initialize`, as the SDK does) under the limits of the call that needs it.
    pub(crate) fn new(
        pre: &InstancePre<StoreData>,
        grant: &Grant,
        log_level: LogLevel,
        ctx: &CallContext,
        http: Arc<http::Outbound>,
    ) -> Result<Self, CallError> {
        let mut store = Self::store(pre, grant, log_level, http)?;
        begin_call(&mut store, grant, ctx, Instant::now())?;
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| classify_instantiation(e, grant))?;
        let mut this = Self::started(store, instance);
        this.initialise().map_err(|e| classify(e, grant))?;
        // Lines an initialiser logged are not the call's (and do not count against it).
        this.store.data_mut().call.logs.discard();
        Ok(this)
    }

    /// As [`new`](Self::new), for instances whose calls run with `call_async` (a module
    /// importing an async host function, or an engine with time slicing).
    pub(crate) async fn new_async(
        pre: &InstancePre<StoreData>,
        grant: &Grant,
        log_level: LogLevel,
        ctx: &CallContext,
        http: Arc<http::Outbound>,
        prepare: impl FnOnce(&mut CallState),
    ) -> Result<Self, CallError> {
        let mut store = Self::store(pre, grant, log_level, http)?;
        prepare(&mut store.data_mut().call);
        store.data_mut().call.is_async = true;
        begin_call(&mut store, grant, ctx, Instant::now())?;
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| classify_instantiation(e, grant))?;
        let mut this = Self::started(store, instance);
        this.initialise_async()
            .await
            .map_err(|e| classify(e, grant))?;
        this.store.data_mut().call.logs.discard();
        Ok(this)
    }

    fn started(mut store: Store<StoreData>, instance: wasmtime::Instance) -> Self {
        // As the SDK's `max_pages`: the initial memories must fit the budget, and then the
        // budget starts again for what the instance grows (guest and Extism memory), so a
        // plug-in tuned against the SDK needs the same number of pages here.
        store.data_mut().budget.used = 0;
        Self {
            store,
            instance,
            exports: HashMap::new(),
            spent: false,
        }
    }

    /// Lets the instance's next call tell the scheduler when it waits.
    pub(crate) fn set_suspend(&mut self, suspend: Option<Suspend>) {
        self.store.data_mut().call.suspend = suspend;
    }

    fn unit_export(&mut self, name: &str) -> Option<TypedFunc<(), ()>> {
        self.instance
            .get_func(&mut self.store, name)?
            .typed::<(), ()>(&self.store)
            .ok()
    }

    /// What initialising the instance runs, as the SDK chooses it.
    fn initialiser(&mut self) -> Initialiser {
        if let Some(hs_init) = self.instance.get_func(&mut self.store, "hs_init") {
            let reactor = self.unit_export("_initialize");
            let results = hs_init.ty(&self.store).results().len();
            return Initialiser::Haskell {
                reactor,
                hs_init,
                results,
            };
        }
        // As the SDK: `__wasm_call_ctors` wins when present, even with a wrong type.
        let init = if self
            .instance
            .get_func(&mut self.store, "__wasm_call_ctors")
            .is_some()
        {
            self.unit_export("__wasm_call_ctors")
        } else {
            self.unit_export("_initialize")
        };
        Initialiser::Unit(init)
    }

    fn initialise(&mut self) -> wasmtime::Result<()> {
        match self.initialiser() {
            Initialiser::Haskell {
                reactor,
                hs_init,
                results,
            } => {
                if let Some(reactor) = reactor {
                    reactor.call(&mut self.store, ())?;
                }
                let mut out = vec![wasmtime::Val::I32(0); results];
                hs_init.call(&mut self.store, &HS_INIT_ARGS, &mut out)
            }
            Initialiser::Unit(Some(init)) => init.call(&mut self.store, ()),
            Initialiser::Unit(None) => Ok(()),
        }
    }

    /// [`initialise`](Self::initialise) with `call_async`.
    async fn initialise_async(&mut self) -> wasmtime::Result<()> {
        match self.initialiser() {
            Initialiser::Haskell {
                reactor,
                hs_init,
                results,
            } => {
                if let Some(reactor) = reactor {
                    reactor.call_async(&mut self.store, ()).await?;
                }
                let mut out = vec![wasmtime::Val::I32(0); results];
                hs_init
                    .call_async(&mut self.store, &HS_INIT_ARGS, &mut out)
                    .await
            }
            Initialiser::Unit(Some(init)) => init.call_async(&mut self.store, ()).await,
            Initialiser::Unit(None) => Ok(()),
        }
    }

    /// Looks the export up once and caches it. Calls borrow the cached `TypedFunc`:
    /// cloning one bumps a reference count shared by every store of the engine, which
    /// made concurrent calls contend.
    fn resolve_export(&mut self, function: &str) -> Result<(), CallError> {
        if self.exports.contains_key(function) {
            return Ok(());
        }
        let func = self
            .instance
            .get_func(&mut self.store, function)
            .ok_or_else(|| CallError::FunctionNotFound {
                function: function.to_owned(),
            })?;
        let ty = func.ty(&self.store);
        let results: Vec<ValType> = ty.results().collect();
        let export = match (ty.params().len(), results.as_slice()) {
            (0, []) => func.typed::<(), ()>(&self.store).ok().map(Export::Unit),
            (0, [ValType::I32]) => func.typed::<(), i32>(&self.store).ok().map(Export::Code),
            _ => None,
        }
        .ok_or_else(|| CallError::FunctionSignature {
            function: function.to_owned(),
            signature: ty.to_string(),
        })?;
        self.exports.insert(function.to_owned(), export);
        Ok(())
    }

    /// Whether this instance may serve another call.
    pub(crate) fn reusable(&self) -> bool {
        !self.spent
    }

    /// Runs one call (`docs/extism-abi.md`, "One call"). After an error for which
    /// [`CallError::poisons_instance`] holds, the instance must be dropped.
    ///
    /// `started` is when the call began (its deadline counts from then); the output's
    /// `duration` is left for the caller to fill in, which reads the clock anyway.
    pub(crate) fn call(
        &mut self,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
        started: Instant,
    ) -> Result<CallOutput, CallError> {
        let fuel_budget = self.prepare(function, input, grant, ctx, started)?;
        let result = match &self.exports[function] {
            Export::Code(f) => f.call(&mut self.store, ()),
            Export::Unit(f) => f.call(&mut self.store, ()).map(|()| 0),
        };
        self.finish(function, result, grant, fuel_budget)
    }

    /// [`call`](Self::call) with `call_async`: an async host function's wait and the end
    /// of a time slice suspend it, and its thread runs other calls meanwhile. Dropping
    /// the future abandons the call; the instance must then be dropped too.
    pub(crate) async fn call_async(
        &mut self,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
        started: Instant,
    ) -> Result<CallOutput, CallError> {
        let fuel_budget = self.prepare(function, input, grant, ctx, started)?;
        let slice = self.store.data().call.time_slice;
        self.store.data_mut().call.slice_ends = slice.map(|slice| Instant::now() + slice);
        let result = match &self.exports[function] {
            Export::Code(f) => f.call_async(&mut self.store, ()).await,
            Export::Unit(f) => f.call_async(&mut self.store, ()).await.map(|()| 0),
        };
        self.finish(function, result, grant, fuel_budget)
    }

    /// Arms the store and writes the input; answers the fuel the call starts with.
    fn prepare(
        &mut self,
        function: &str,
        input: &[u8],
        grant: &Grant,
        ctx: &CallContext,
        started: Instant,
    ) -> Result<u64, CallError> {
        self.resolve_export(function)?;
        begin_call(&mut self.store, grant, ctx, started)?;
        {
            let data = self.store.data_mut();
            data.memory.reset();
            let StoreData { memory, budget, .. } = data;
            let handle = memory
                .write_new(input, budget)
                .map_err(|e| classify(e, grant))?;
            memory.set_input(handle, input.len() as u64);
        }
        // Only a metered store has fuel to read (asking an unmetered one makes an error,
        // with a backtrace when those are on: microseconds per call).
        Ok(if grant.fuel.is_some() {
            self.store.get_fuel().unwrap_or(0)
        } else {
            0
        })
    }

    /// Reads the call's outcome out of the store and classifies a failure.
    fn finish(
        &mut self,
        function: &str,
        result: wasmtime::Result<i32>,
        grant: &Grant,
        fuel_budget: u64,
    ) -> Result<CallOutput, CallError> {
        let metered = grant.fuel.is_some();
        if function == "_start" {
            self.spent = true;
        }
        // A WASI `proc_exit(0)` is a success, as in the SDK; another code is the exit code.
        let result = match result {
            Err(e) => match e.downcast_ref::<wasi_common::I32Exit>() {
                Some(wasi_common::I32Exit(0)) => Ok(0),
                Some(wasi_common::I32Exit(code)) => {
                    self.spent = true;
                    Ok(*code)
                }
                None => Err(e),
            },
            ok => ok,
        };
        let fuel_used = if metered {
            fuel_budget.saturating_sub(self.store.get_fuel().unwrap_or(0))
        } else {
            0
        };
        let data = self.store.data_mut();
        data.collect_wasi_output();
        let (logs, logs_dropped) = data.call.logs.finish();
        data.call.deadline = None;
        let guest_error = data
            .memory
            .error()
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
        let output = matches!(result, Ok(0))
            .then(|| data.memory.output().to_vec())
            .unwrap_or_default();
        // What the call needed beyond a small floor goes back now, not at the next call:
        // an idle warm instance must not keep the peak of its busiest call.
        data.memory.release();
        match result {
            Err(e) => {
                let error = classify(e, grant);
                // A guest message explains a trap the guest raised on purpose (as the SDK
                // reports it); limits and host failures keep their own kind.
                match (error, guest_error) {
                    (CallError::Trap { .. }, Some(message)) => {
                        self.spent = true;
                        Err(CallError::Guest { code: 134, message })
                    }
                    (error, _) => Err(error),
                }
            }
            Ok(code) => {
                if let Some(message) = guest_error {
                    return Err(CallError::Guest { code, message });
                }
                if code != 0 {
                    return Err(CallError::ExitCode { code });
                }
                if output.len() as u64 > grant.max_output_bytes {
                    return Err(CallError::OutputTooLarge {
                        size: output.len() as u64,
                        limit: grant.max_output_bytes,
                    });
                }
                Ok(CallOutput {
                    output,
                    logs,
                    logs_dropped,
                    fuel_used,
                    duration: Duration::ZERO,
                })
            }
        }
    }
}

/// Arms the store for a call: context, config, fuel and deadline.
fn begin_call(
    store: &mut Store<StoreData>,
    grant: &Grant,
    ctx: &CallContext,
    started: Instant,
) -> Result<(), CallError> {
    if let Some(fuel) = grant.fuel {
        // Only instances of the metered runtime serve grants with fuel.
        store.set_fuel(fuel).map_err(|e| CallError::Internal {
            message: format!("{e:#}"),
        })?;
    }
    store.set_epoch_deadline(1);
    let call = &mut store.data_mut().call;
    // Field by field, so that a warm instance reuses the tenant string's allocation.
    call.ctx.tenant.clone_from(&ctx.tenant);
    call.ctx.run_id.clone_from(&ctx.run_id);
    call.ctx.cancel = ctx.cancel.clone();
    call.ctx.emitted.clone_from(&ctx.emitted);
    call.ctx.tape.clone_from(&ctx.tape);
    call.ctx
        .emit_budget
        .reset(grant.max_emits, grant.max_emit_bytes);
    call.config.clone_from(&grant.config);
    call.allowed_hosts.clone_from(&grant.allowed_hosts);
    call.max_http_response_bytes = grant.max_http_response_bytes;
    call.http_status = 0;
    call.http_headers.clear();
    call.timeout = grant.timeout;
    call.deadline = started.checked_add(grant.timeout);
    call.logs.start(grant.max_log_lines, grant.max_log_bytes);
    Ok(())
}

/// Turns an instantiation failure into a call error: a full instance pool, a limit
/// hit by the module's initial memory, or a module that cannot be instantiated here.
fn classify_instantiation(error: wasmtime::Error, grant: &Grant) -> CallError {
    if error.is::<wasmtime::PoolConcurrencyLimitError>() {
        return CallError::Overloaded {
            reason: format!("{error:#}"),
        };
    }
    if error.is::<Abort>() || error.is::<Trap>() {
        return classify(error, grant);
    }
    CallError::Link {
        message: format!("{error:#}"),
    }
}

/// Turns an error out of wasm execution into the call error it stands for.
fn classify(error: wasmtime::Error, grant: &Grant) -> CallError {
    if let Some(Abort(error)) = error.downcast_ref::<Abort>() {
        return error.clone();
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => CallError::FuelExhausted {
            budget: grant.fuel.unwrap_or(u64::MAX),
        },
        Some(Trap::Interrupt) => CallError::Timeout {
            limit: grant.timeout,
        },
        Some(trap) => CallError::Trap {
            message: trap.to_string(),
        },
        None => CallError::Trap {
            message: format!("{:#}", error.root_cause()),
        },
    }
}
