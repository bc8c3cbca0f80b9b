//! The `extism:host/user` functions: the embedder's host functions (and the built-ins
//! `kv_*` and `emit`) on a wasmtime `Linker`. A sync one runs on the call's thread; an
//! async one's future runs on the embedder's runtime while the call waits suspended.
//! Both answer from, or record to, the call's tape when it has one.

use wasmtime::{FuncType, Linker, Val, ValType};

use super::abi::{Ctx, Res, abort, put};
use super::{StoreData, USER};
use crate::error::CallError;
use crate::host::{HostFunction, HostImpl};
use crate::tape::{Answer, HostCall, Replayed, Tape};

/// Defines one embedder host function in `extism:host/user`. An async one runs its
/// future on `runtime`.
pub(crate) fn define_user(
    linker: &mut Linker<StoreData>,
    function: &HostFunction,
    runtime: Option<&tokio::runtime::Handle>,
    suspendable: bool,
) -> Res<()> {
    let func = match &function.func {
        HostImpl::Sync(func) => func.clone(),
        // A blocking call never reaches an async host function (the engine runs every
        // call that may as a suspendable one); should one, it fails, never blocks.
        HostImpl::Async(_) if !suspendable => {
            let name = function.name.clone();
            std::sync::Arc::new(move |_: &crate::host::CallContext, _: &[&[u8]]| {
                Err(crate::host::HostError::new(format!(
                    "`{name}` is async and this call is not suspendable"
                )))
            })
        }
        HostImpl::Async(func) => {
            let runtime = runtime
                .ok_or_else(|| {
                    wasmtime::Error::msg(format!(
                        "async host function `{}` needs the engine to be built inside a Tokio runtime",
                        function.name
                    ))
                })?
                .clone();
            return define_user_async(linker, function, func.clone(), runtime);
        }
    };
    let ty = user_type(linker.engine(), function);
    let function = function.clone();
    linker.func_new(
        USER,
        &function.name.clone(),
        ty,
        move |mut c, params, results| {
            let data = c.data_mut();
            let mut args = Vec::with_capacity(params.len());
            for (index, param) in params.iter().enumerate() {
                let handle = param.unwrap_i64() as u64;
                match data.memory.block(handle) {
                    Some(bytes) => args.push(bytes),
                    None => {
                        return Err(abort(CallError::HostFunction {
                            name: function.name.clone(),
                            message: format!(
                                "argument {index} is not a valid memory handle: {handle}"
                            ),
                        }));
                    }
                }
            }
            let outcome = match data.call.ctx.tape.clone() {
                None => {
                    let outcome = func(&data.call.ctx, &args);
                    drop(args);
                    outcome
                }
                Some(tape) => {
                    let owned: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
                    drop(args);
                    taped(&tape, &function.name, owned, |args| {
                        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                        func(&data.call.ctx, &refs)
                    })?
                }
            };
            match outcome {
                Ok(output) => {
                    if let Some(slot) = results.first_mut() {
                        let handle = match output {
                            Some(bytes) => put(data, &bytes)?,
                            None => 0,
                        };
                        *slot = Val::I64(handle);
                    }
                    Ok(())
                }
                Err(e) => Err(abort(CallError::HostFunction {
                    name: function.name.clone(),
                    message: e.0,
                })),
            }
        },
    )?;
    Ok(())
}

type HostOutcome = Result<Option<Vec<u8>>, crate::host::HostError>;

/// A host call under a tape: answered from it (replaying; a divergence aborts the call,
/// and nothing runs), or run and recorded.
fn taped(
    tape: &Tape,
    function: &str,
    args: Vec<Vec<u8>>,
    run: impl FnOnce(&[Vec<u8>]) -> HostOutcome,
) -> Res<HostOutcome> {
    if tape.is_replaying() {
        return match tape.replay(function, &args) {
            Replayed::Answer(Answer::Output(output)) => Ok(Ok(output)),
            Replayed::Answer(Answer::Error(message)) => Ok(Err(crate::host::HostError(message))),
            Replayed::Diverged(error) => Err(abort(error)),
        };
    }
    let outcome = run(&args);
    tape.record(HostCall {
        function: function.to_owned(),
        args,
        answer: answer_of(&outcome),
    });
    Ok(outcome)
}

fn answer_of(outcome: &HostOutcome) -> Answer {
    match outcome {
        Ok(output) => Answer::Output(output.clone()),
        Err(e) => Answer::Error(e.0.clone()),
    }
}

fn user_type(engine: &wasmtime::Engine, function: &HostFunction) -> FuncType {
    let results: &[ValType] = if function.returns {
        &[ValType::I64]
    } else {
        &[]
    };
    FuncType::new(
        engine,
        std::iter::repeat_n(ValType::I64, function.params),
        results.iter().cloned(),
    )
}

/// Puts a host function's answer in the guest's memory (or fails the call).
fn finish_user(
    caller: &mut Ctx<'_>,
    results: &mut [Val],
    answer: HostOutcome,
    failed: &dyn Fn(String) -> wasmtime::Error,
) -> Res<()> {
    let output = answer.map_err(|e| failed(e.0))?;
    if let Some(slot) = results.first_mut() {
        let handle = match output {
            Some(bytes) => put(caller.data_mut(), &bytes)?,
            None => 0,
        };
        *slot = Val::I64(handle);
    }
    Ok(())
}

/// Never called: a replayed host call is answered from its tape.
fn unreachable_host() -> HostOutcome {
    Err(crate::host::HostError::new("a replayed host call ran"))
}

/// How an async host function's wait ended.
enum Waited {
    Answered(Result<Option<Vec<u8>>, crate::host::HostError>),
    Timeout,
    Cancelled,
}

/// Aborts the embedder's future when the call waiting on it goes away (its deadline,
/// a cancel, a dropped call).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes once `token` is cancelled (checked every few milliseconds: a cancel is a
/// flag, and the epoch ticker checks running calls no more often).
async fn cancelled(token: crate::host::CancelToken) {
    while !token.is_cancelled() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// An async host function: the arguments are copied out of Extism memory, the future
/// runs on the embedder's runtime, and the call waits for it (suspended, so that its
/// worker runs other calls) until it answers, the call's deadline passes or the call is
/// cancelled. Only the wait is suspended time: no fuel is spent, and the deadline
/// still counts.
fn define_user_async(
    linker: &mut Linker<StoreData>,
    function: &HostFunction,
    func: std::sync::Arc<crate::host::AsyncHostFn>,
    runtime: tokio::runtime::Handle,
) -> Res<()> {
    let ty = user_type(linker.engine(), function);
    let name = function.name.clone();
    linker.func_new_async(
        USER,
        &function.name,
        ty,
        move |mut caller, params, results| {
            let (func, runtime, name) = (func.clone(), runtime.clone(), name.clone());
            Box::new(async move {
                let failed = |message: String| {
                    abort(CallError::HostFunction {
                        name: name.clone(),
                        message,
                    })
                };
                let data = caller.data_mut();
                let mut args = Vec::with_capacity(params.len());
                for (index, param) in params.iter().enumerate() {
                    let handle = param.unwrap_i64() as u64;
                    match data.memory.block(handle) {
                        Some(bytes) => args.push(bytes.to_vec()),
                        None => {
                            return Err(failed(format!(
                                "argument {index} is not a valid memory handle: {handle}"
                            )));
                        }
                    }
                }
                let call = &data.call;
                let tape = call.ctx.tape.clone();
                if let Some(tape) = tape.as_ref().filter(|t| t.is_replaying()) {
                    // Answered from the tape: the future is never made.
                    let answer = taped(tape, &name, args, |_| unreachable_host())?;
                    return finish_user(&mut caller, results, answer, &failed);
                }
                let recorded_args = tape.as_ref().map(|_| args.clone());
                let (deadline, timeout) = (call.deadline(), call.timeout());
                let (cancel, ctx) = (call.ctx.cancel.clone(), call.ctx.clone());
                let waiting = call.suspend.as_ref().and_then(|suspend| (suspend.0)());
                // The future races the call's deadline and cancel on the embedder's
                // runtime; the worker only awaits the outcome (it runs no runtime).
                let task = runtime.spawn(async move {
                    let until_deadline = async {
                        match deadline {
                            Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        answer = func(ctx, args) => Waited::Answered(answer),
                        () = until_deadline => Waited::Timeout,
                        () = cancelled(cancel) => Waited::Cancelled,
                    }
                });
                let abort_on_drop = AbortOnDrop(task.abort_handle());
                let joined = task.await;
                drop(abort_on_drop);
                drop(waiting);
                let answer = match joined {
                    Ok(Waited::Answered(answer)) => answer,
                    Ok(Waited::Timeout) => {
                        return Err(abort(CallError::Timeout { limit: timeout }));
                    }
                    Ok(Waited::Cancelled) => return Err(abort(CallError::Cancelled)),
                    Err(e) if e.is_panic() => {
                        return Err(failed("the host function panicked".into()));
                    }
                    Err(e) => return Err(failed(format!("the host function did not finish: {e}"))),
                };
                if let (Some(tape), Some(args)) = (tape, recorded_args) {
                    tape.record(HostCall {
                        function: name.clone(),
                        args,
                        answer: answer_of(&answer),
                    });
                }
                finish_user(&mut caller, results, answer, &failed)
            })
        },
    )?;
    Ok(())
}
