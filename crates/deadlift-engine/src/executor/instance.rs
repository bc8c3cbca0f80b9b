//! One instance of a module: its store, the call procedure (`call` and `call_async`),
//! initialisation as the SDK does it, the epoch callback (deadline, cancel, the time
//! slice's yield), and how failures are classified.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{InstancePre, Store, Trap, TypedFunc, UpdateDeadline, ValType};

use super::memory::ExtismMemory;
use super::{Abort, CallOutput, CallState, LogLevel, MemoryBudget, StoreData, Suspend, http, wasi};
use crate::error::CallError;
use crate::grant::Grant;
use crate::host::CallContext;

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
    if let Some(tape) = &ctx.tape {
        start_tape(store.data_mut(), tape, grant)?;
    }
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

/// A recording tape notes the vars and config the call starts with; a replaying one
/// gives the (fresh) instance the recorded call's vars, charged as `var_set` charges them.
fn start_tape(
    data: &mut StoreData,
    tape: &crate::tape::Tape,
    grant: &Grant,
) -> Result<(), CallError> {
    if !tape.is_replaying() {
        tape.begin(&data.vars, &grant.config);
        return Ok(());
    }
    let vars = tape.start().vars;
    if vars.is_empty() {
        return Ok(());
    }
    let held: u64 = vars
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64 + super::abi::VAR_OVERHEAD)
        .sum();
    if held > data.max_var_bytes {
        return Err(CallError::MemoryLimit {
            limit_bytes: data.max_var_bytes,
        });
    }
    data.budget
        .charge_vars(held)
        .map_err(|Abort(error)| error)?;
    data.vars = vars;
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
