//! The `extism:host/env` functions, defined on a wasmtime `Linker` with the SDK's exact
//! semantics (`docs/extism-abi.md`): forgiving
//! bounds, handle ownership, error rules. The table [`ENV_FUNCTIONS`] is the one list of
//! what a guest may import from `extism:host/env`; the registry validates against it.

use wasmtime::{Caller, Linker};

use super::{Abort, ENV, LogLevel, StoreData};
use crate::error::CallError;
use crate::tape::{Answer, HostCall, Replayed, Tape};

/// A Wasm value type in an env function signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    I32,
    I64,
}

/// Every function a guest may import from `extism:host/env`: name, params, results.
/// Besides the documented ABI this includes the kernel exports the SDK also links
/// (`input_set`, `output_offset`, `output_length`, `reset`, `memory_bytes`).
pub(crate) const ENV_FUNCTIONS: &[(&str, &[Ty], &[Ty])] = {
    use Ty::{I32, I64};
    &[
        ("alloc", &[I64], &[I64]),
        ("free", &[I64], &[]),
        ("length", &[I64], &[I64]),
        ("length_unsafe", &[I64], &[I64]),
        ("load_u8", &[I64], &[I32]),
        ("load_u64", &[I64], &[I64]),
        ("store_u8", &[I64, I32], &[]),
        ("store_u64", &[I64, I64], &[]),
        ("input_length", &[], &[I64]),
        ("input_offset", &[], &[I64]),
        ("input_load_u8", &[I64], &[I32]),
        ("input_load_u64", &[I64], &[I64]),
        ("input_set", &[I64, I64], &[]),
        ("output_set", &[I64, I64], &[]),
        ("output_offset", &[], &[I64]),
        ("output_length", &[], &[I64]),
        ("error_set", &[I64], &[]),
        ("error_get", &[], &[I64]),
        ("reset", &[], &[]),
        ("memory_bytes", &[], &[I64]),
        ("config_get", &[I64], &[I64]),
        ("var_get", &[I64], &[I64]),
        ("var_set", &[I64, I64], &[]),
        ("http_request", &[I64, I64], &[I64]),
        ("http_status_code", &[], &[I32]),
        ("http_headers", &[], &[I64]),
        ("log_trace", &[I64], &[]),
        ("log_debug", &[I64], &[]),
        ("log_info", &[I64], &[]),
        ("log_warn", &[I64], &[]),
        ("log_error", &[I64], &[]),
        ("get_log_level", &[], &[I32]),
    ]
};

pub(super) type Ctx<'a> = Caller<'a, StoreData>;
pub(super) type Res<T> = wasmtime::Result<T>;

/// Handles are unsigned offsets carried in `i64`s.
fn h(raw: i64) -> u64 {
    raw as u64
}

pub(super) fn abort(error: CallError) -> wasmtime::Error {
    wasmtime::Error::new(Abort(error))
}

/// A failure of a built-in env function, reported like a host function's.
fn env_failure(name: &str, message: impl Into<String>) -> wasmtime::Error {
    abort(CallError::HostFunction {
        name: name.to_owned(),
        message: message.into(),
    })
}

/// A UTF-8 string behind a handle that the function takes ownership of. `None` when
/// the handle is not the start of a live block (0 reads as the empty string).
fn take_str(data: &mut StoreData, handle: u64, what: &str, function: &str) -> Res<String> {
    let Some(bytes) = data.memory.block(handle) else {
        return Err(env_failure(
            function,
            format!("invalid handle offset for {what}: {handle}"),
        ));
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|_| env_failure(function, format!("{what} is not UTF-8")))?
        .to_owned();
    data.memory.free(handle);
    Ok(text)
}

/// What `http_request` was asked: the parsed request and its body, both handles freed.
fn http_request_args(
    data: &mut StoreData,
    request: i64,
    body: i64,
) -> Res<(super::http::GuestRequest, Option<Vec<u8>>)> {
    const NAME: &str = "http_request";
    data.call.http_status = 0;
    data.call.http_headers.clear();
    let Some(bytes) = data.memory.block(h(request)) else {
        return Err(env_failure(
            NAME,
            format!("invalid handle offset for http request: {request}"),
        ));
    };
    let parsed: Result<super::http::GuestRequest, _> = serde_json::from_slice(bytes);
    data.memory.free(h(request));
    let parsed = parsed.map_err(|e| {
        env_failure(
            NAME,
            format!("the request is not JSON {{\"url\", \"method\", \"headers\"}}: {e}"),
        )
    })?;
    let body_bytes = match h(body) {
        0 => None,
        handle => {
            let bytes = data
                .memory
                .block(handle)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    env_failure(
                        NAME,
                        format!("invalid handle offset for http request body: {body}"),
                    )
                })?;
            data.memory.free(handle);
            Some(bytes)
        }
    };
    Ok((parsed, body_bytes))
}

/// Stores a response for the guest: status and headers for their env functions, the
/// body as a new block.
fn http_response(data: &mut StoreData, response: super::http::GuestResponse) -> Res<i64> {
    data.call.http_status = response.status;
    data.call.http_headers = response.headers;
    put(data, &response.body)
}

/// `http_request(request, body) -> response body`: the request is JSON (url, method,
/// headers); both handles are the host's to free. Performed only for allowed hosts.
/// This thread waits for it (a blocking call).
fn http_request(mut c: Ctx<'_>, request: i64, body: i64) -> Res<i64> {
    let data = c.data_mut();
    let (parsed, body) = http_request_args(data, request, body)?;
    let recording = match http_tape(data, &parsed, body.as_ref())? {
        HttpTape::Replayed(response) => return http_response(data, response.map_err(abort)?),
        HttpTape::Run(recording) => recording,
    };
    let call = &data.call;
    let response = data.http.clone().send(
        parsed,
        body,
        &call.allowed_hosts,
        call.max_http_response_bytes,
        call.remaining(),
        call.timeout(),
    );
    record_http(recording, &response);
    http_response(data, response.map_err(abort)?)
}

/// [`http_request`] for a suspendable call: it waits without holding its worker.
fn define_http_request_async(linker: &mut Linker<StoreData>) -> Res<()> {
    linker.func_wrap_async(
        ENV,
        "http_request",
        |mut c: Ctx<'_>, (request, body): (i64, i64)| {
            Box::new(async move {
                let data = c.data_mut();
                let (parsed, body) = http_request_args(data, request, body)?;
                let recording = match http_tape(data, &parsed, body.as_ref())? {
                    HttpTape::Replayed(response) => {
                        return http_response(data, response.map_err(abort)?);
                    }
                    HttpTape::Run(recording) => recording,
                };
                let call = &data.call;
                let (allowed, max_bytes) =
                    (call.allowed_hosts.clone(), call.max_http_response_bytes);
                let (remaining, timeout) = (call.remaining(), call.timeout());
                let waiting = call.suspend.as_ref().and_then(|suspend| (suspend.0)());
                let http = data.http.clone();
                let response = http
                    .send_async(parsed, body, &allowed, max_bytes, remaining, timeout)
                    .await;
                drop(waiting);
                record_http(recording, &response);
                http_response(c.data_mut(), response.map_err(abort)?)
            })
        },
    )?;
    Ok(())
}

/// Copies `bytes` into a new block; empty is handle 0 (as the SDK's `memory_new`).
pub(super) fn put(data: &mut StoreData, bytes: &[u8]) -> Res<i64> {
    let StoreData { memory, budget, .. } = data;
    memory.write_new(bytes, budget).map(|h| h as i64)
}

/// Defines every env function. A suspendable linker's `http_request` waits without
/// holding its worker.
pub(crate) fn define_env(linker: &mut Linker<StoreData>, suspendable: bool) -> Res<()> {
    linker.func_wrap(ENV, "alloc", |mut c: Ctx<'_>, len: i64| -> Res<i64> {
        let StoreData { memory, budget, .. } = c.data_mut();
        memory.alloc(h(len), budget).map(|h| h as i64)
    })?;
    linker.func_wrap(ENV, "free", |mut c: Ctx<'_>, handle: i64| {
        c.data_mut().memory.free(h(handle));
    })?;
    linker.func_wrap(ENV, "length", |c: Ctx<'_>, handle: i64| -> i64 {
        c.data().memory.length(h(handle)) as i64
    })?;
    linker.func_wrap(ENV, "length_unsafe", |c: Ctx<'_>, handle: i64| -> i64 {
        c.data().memory.length(h(handle)) as i64
    })?;
    linker.func_wrap(ENV, "load_u8", |c: Ctx<'_>, offset: i64| -> i32 {
        i32::from(c.data().memory.load_u8(h(offset)))
    })?;
    linker.func_wrap(ENV, "load_u64", |c: Ctx<'_>, offset: i64| -> i64 {
        c.data().memory.load_u64(h(offset)) as i64
    })?;
    linker.func_wrap(
        ENV,
        "store_u8",
        |mut c: Ctx<'_>, offset: i64, value: i32| {
            c.data_mut().memory.store_u8(h(offset), value as u8);
        },
    )?;
    linker.func_wrap(
        ENV,
        "store_u64",
        |mut c: Ctx<'_>, offset: i64, value: i64| {
            c.data_mut().memory.store_u64(h(offset), value as u64);
        },
    )?;
    linker.func_wrap(ENV, "input_length", |c: Ctx<'_>| -> i64 {
        c.data().memory.input_length() as i64
    })?;
    linker.func_wrap(ENV, "input_offset", |c: Ctx<'_>| -> i64 {
        c.data().memory.input_offset() as i64
    })?;
    linker.func_wrap(ENV, "input_load_u8", |c: Ctx<'_>, index: i64| -> i32 {
        i32::from(c.data().memory.input_load_u8(h(index)))
    })?;
    linker.func_wrap(ENV, "input_load_u64", |c: Ctx<'_>, index: i64| -> i64 {
        c.data().memory.input_load_u64(h(index)) as i64
    })?;
    linker.func_wrap(ENV, "input_set", |mut c: Ctx<'_>, handle: i64, len: i64| {
        c.data_mut().memory.set_input(h(handle), h(len));
    })?;
    linker.func_wrap(
        ENV,
        "output_set",
        |mut c: Ctx<'_>, offset: i64, len: i64| {
            c.data_mut().memory.set_output(h(offset), h(len));
        },
    )?;
    linker.func_wrap(ENV, "output_offset", |c: Ctx<'_>| -> i64 {
        c.data().memory.output_range().0 as i64
    })?;
    linker.func_wrap(ENV, "output_length", |c: Ctx<'_>| -> i64 {
        c.data().memory.output_range().1 as i64
    })?;
    linker.func_wrap(ENV, "error_set", |mut c: Ctx<'_>, handle: i64| {
        c.data_mut().memory.set_error(h(handle));
    })?;
    linker.func_wrap(ENV, "error_get", |c: Ctx<'_>| -> i64 {
        c.data().memory.error_handle() as i64
    })?;
    linker.func_wrap(ENV, "reset", |mut c: Ctx<'_>| {
        c.data_mut().memory.reset();
    })?;
    linker.func_wrap(ENV, "memory_bytes", |c: Ctx<'_>| -> i64 {
        (c.data().memory.pages() * super::memory::PAGE_SIZE) as i64
    })?;

    linker.func_wrap(ENV, "config_get", |mut c: Ctx<'_>, key: i64| -> Res<i64> {
        let data = c.data_mut();
        let key = take_str(data, h(key), "config key", "config_get")?;
        match data.call.config.get(&key) {
            Some(value) => {
                let value = value.clone();
                put(data, value.as_bytes())
            }
            None => Ok(0),
        }
    })?;
    linker.func_wrap(ENV, "var_get", |mut c: Ctx<'_>, key: i64| -> Res<i64> {
        let data = c.data_mut();
        let key = take_str(data, h(key), "var key", "var_get")?;
        match data.vars.get(&key) {
            Some(value) => {
                let value = value.clone();
                put(data, &value)
            }
            None => Ok(0),
        }
    })?;
    linker.func_wrap(ENV, "var_set", var_set)?;

    if suspendable {
        define_http_request_async(linker)?;
    } else {
        linker.func_wrap(ENV, "http_request", http_request)?;
    }
    linker.func_wrap(ENV, "http_status_code", |c: Ctx<'_>| -> i32 {
        i32::from(c.data().call.http_status)
    })?;
    linker.func_wrap(ENV, "http_headers", |mut c: Ctx<'_>| -> Res<i64> {
        let data = c.data_mut();
        if data.call.http_headers.is_empty() {
            return Ok(0);
        }
        let json = serde_json::to_vec(&data.call.http_headers).unwrap_or_default();
        put(data, &json)
    })?;

    for level in LogLevel::ALL {
        linker.func_wrap(ENV, level.import_name(), move |mut c: Ctx<'_>, msg: i64| {
            log(c.data_mut(), level, h(msg))
        })?;
    }
    linker.func_wrap(ENV, "get_log_level", |c: Ctx<'_>| -> i32 {
        c.data().log_level as i32
    })?;
    Ok(())
}

/// Size of the bookkeeping the SDK charges per var against the var cap.
pub(crate) const VAR_OVERHEAD: u64 = 48;

fn var_set(mut c: Ctx<'_>, key: i64, value: i64) -> Res<()> {
    let data = c.data_mut();
    if data.max_var_bytes == 0 {
        return Err(env_failure("var_set", "vars are disabled by this host"));
    }
    let (key_handle, value_handle) = (h(key), h(value));
    let Some(key_bytes) = data.memory.block(key_handle) else {
        return Err(env_failure(
            "var_set",
            format!("invalid handle offset for var key: {key_handle}"),
        ));
    };
    let key = std::str::from_utf8(key_bytes)
        .map_err(|_| env_failure("var_set", "var key is not UTF-8"))?
        .to_owned();
    if value_handle == 0 {
        data.vars.remove(&key);
        data.memory.free(key_handle);
        return Ok(());
    }
    let Some(value) = data.memory.block(value_handle) else {
        return Err(env_failure(
            "var_set",
            format!("invalid handle offset for var value: {value_handle}"),
        ));
    };
    // The SDK's accounting, including its double count of a key being replaced.
    let existing: u64 = data
        .vars
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64 + VAR_OVERHEAD)
        .sum();
    let size = VAR_OVERHEAD + key.len() as u64 + value.len() as u64 + existing;
    if size > data.max_var_bytes {
        return Err(env_failure("var_set", "variable store is full"));
    }
    // Held on the host: charged to the instance's memory budget like guest memory.
    let held = existing
        - data
            .vars
            .get(&key)
            .map_or(0, |old| (key.len() + old.len()) as u64 + VAR_OVERHEAD)
        + (key.len() + value.len()) as u64
        + VAR_OVERHEAD;
    data.budget
        .charge_vars(held)
        .map_err(wasmtime::Error::new)?;
    let value = value.to_vec();
    data.memory.free(value_handle);
    data.memory.free(key_handle);
    data.vars.insert(key, value);
    Ok(())
}

fn log(data: &mut StoreData, level: LogLevel, handle: u64) -> Res<()> {
    if level < data.log_level {
        // Ownership passes even when the message is filtered out.
        data.memory.free(handle);
        return Ok(());
    }
    let Some(bytes) = data.memory.block(handle) else {
        return Err(env_failure(
            level.import_name(),
            format!("invalid handle offset for log message: {handle}"),
        ));
    };
    let message = String::from_utf8_lossy(bytes).into_owned();
    data.memory.free(handle);
    data.push_log(level, message);
    Ok(())
}

/// `http_request` under a tape: the request's document and body are its arguments, the
/// response (as JSON) or the error's message its answer.
enum HttpTape {
    /// Answered from the tape.
    Replayed(Result<super::http::GuestResponse, CallError>),
    /// Run it, and record it here (if recording).
    Run(Option<(Tape, Vec<Vec<u8>>)>),
}

fn http_tape(
    data: &StoreData,
    request: &super::http::GuestRequest,
    body: Option<&Vec<u8>>,
) -> Res<HttpTape> {
    let Some(tape) = data.call.ctx.tape.clone() else {
        return Ok(HttpTape::Run(None));
    };
    let args = vec![
        serde_json::to_vec(request).unwrap_or_default(),
        body.cloned().unwrap_or_default(),
    ];
    if !tape.is_replaying() {
        return Ok(HttpTape::Run(Some((tape, args))));
    }
    let failed = |message: String| CallError::HostFunction {
        name: "http_request".into(),
        message,
    };
    Ok(HttpTape::Replayed(
        match tape.replay("http_request", &args) {
            Replayed::Answer(Answer::Output(bytes)) => {
                serde_json::from_slice(&bytes.unwrap_or_default())
                    .map_err(|e| failed(e.to_string()))
            }
            Replayed::Answer(Answer::Error(message)) => Err(failed(message)),
            Replayed::Diverged(error) => return Err(abort(error)),
        },
    ))
}

fn record_http(
    recording: Option<(Tape, Vec<Vec<u8>>)>,
    response: &Result<super::http::GuestResponse, CallError>,
) {
    if let Some((tape, args)) = recording {
        tape.record(HostCall {
            function: "http_request".into(),
            args,
            answer: match response {
                Ok(response) => Answer::Output(serde_json::to_vec(response).ok()),
                Err(e) => Answer::Error(e.to_string()),
            },
        });
    }
}
