//! Host functions: what the agent (or an application embedding it) offers to plug-ins in
//! the `extism:host/user` namespace, and the per-call context they receive.
//!
//! A host function sees bytes (or JSON) in and out; the engine does the handle plumbing.
//! The built-ins `kv_get`, `kv_set`, `kv_delete` and `emit` are ordinary host functions
//! over the [`KvStore`] and [`EventSink`] traits, so storage can change underneath them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

/// Who a call runs for. Host functions scope everything they touch by `tenant`.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub tenant: String,
    /// The run this call belongs to, when there is one (workflows, hooks).
    pub run_id: Option<String>,
    /// Cancels the call from outside; a cancelled call fails with `CallError::Cancelled`.
    pub cancel: CancelToken,
    /// When set, `emit` collects events here instead of publishing them, so that a
    /// workflow step commits them together with its result (and drops them if the
    /// attempt fails).
    pub emitted: Option<EmitBuffer>,
    /// What the call may still emit, reset from its grant when the call starts.
    pub(crate) emit_budget: EmitBudget,
    /// Records the call's host calls, or answers them from an earlier recording.
    pub tape: Option<crate::tape::Tape>,
}

/// Events (and their bytes) a call may still emit: each instance keeps one, and every
/// call starts it afresh from the grant. Without a call (a host function run by hand)
/// nothing is counted.
#[derive(Debug, Clone)]
pub(crate) struct EmitBudget(Arc<[std::sync::atomic::AtomicU64; 2]>);

impl Default for EmitBudget {
    fn default() -> Self {
        use std::sync::atomic::AtomicU64;
        Self(Arc::new([
            AtomicU64::new(u64::MAX),
            AtomicU64::new(u64::MAX),
        ]))
    }
}

impl EmitBudget {
    pub(crate) fn reset(&self, events: u64, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0[0].store(events, Relaxed);
        self.0[1].store(bytes, Relaxed);
    }

    /// Takes one event of `size` bytes from the budget, or says what it allows.
    fn take(&self, size: u64) -> Result<(), String> {
        use std::sync::atomic::Ordering::Relaxed;
        let [events, bytes] = &*self.0;
        let (events_left, bytes_left) = (events.load(Relaxed), bytes.load(Relaxed));
        if events_left == 0 || bytes_left < size {
            return Err(format!(
                "this call has emitted all its grant allows (max_emits, max_emit_bytes); {events_left} events and {bytes_left} bytes were left, this event is {size} bytes"
            ));
        }
        // One call runs on one thread at a time: no other taker races these.
        events.store(events_left - 1, Relaxed);
        bytes.store(bytes_left - size, Relaxed);
        Ok(())
    }
}

/// Events a call emitted, held until its caller commits them.
pub type EmitBuffer = Arc<Mutex<Vec<EmittedEvent>>>;

impl CallContext {
    pub fn new(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            ..Self::default()
        }
    }

    pub fn with_run_id(mut self, run_id: impl Into<String>) -> Self {
        self.run_id = Some(run_id.into());
        self
    }

    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = cancel;
        self
    }

    pub fn with_emit_buffer(mut self, buffer: EmitBuffer) -> Self {
        self.emitted = Some(buffer);
        self
    }

    /// Records the call's host calls on `tape`, or (a replaying tape) answers them from it.
    pub fn with_tape(mut self, tape: crate::tape::Tape) -> Self {
        self.tape = Some(tape);
        self
    }
}

/// A flag shared with a running call. Cancelling it stops that call, and only that call.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The error a host function returns; the call then fails with
/// `CallError::HostFunction` naming the function and carrying this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HostError(pub String);

impl HostError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

type HostFn =
    dyn Fn(&CallContext, &[&[u8]]) -> Result<Option<Vec<u8>>, HostError> + Send + Sync + 'static;

/// What an async host function returns: a future the engine runs on the embedder's
/// Tokio runtime while the plug-in's call is suspended.
pub type HostFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Vec<u8>>, HostError>> + Send>>;

pub(crate) type AsyncHostFn =
    dyn Fn(CallContext, Vec<Vec<u8>>) -> HostFuture + Send + Sync + 'static;

/// How a host function answers: at once, or later (a future).
#[derive(Clone)]
pub(crate) enum HostImpl {
    Sync(Arc<HostFn>),
    Async(Arc<AsyncHostFn>),
}

/// A named function offered to plug-ins in `extism:host/user`.
///
/// Its Wasm signature is `params` × `i64` (memory handles) → one `i64` handle when it
/// `returns`, else nothing; the closure receives the bytes behind the handles.
#[derive(Clone)]
pub struct HostFunction {
    pub(crate) name: String,
    pub(crate) params: usize,
    pub(crate) returns: bool,
    pub(crate) func: HostImpl,
}

impl fmt::Debug for HostFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostFunction")
            .field("name", &self.name)
            .field("params", &self.params)
            .field("returns", &self.returns)
            .field("is_async", &self.is_async())
            .finish_non_exhaustive()
    }
}

impl HostFunction {
    /// One byte string in, one out (`(i64) -> i64`).
    pub fn bytes<F>(name: impl Into<String>, func: F) -> Self
    where
        F: Fn(&CallContext, &[u8]) -> Result<Vec<u8>, HostError> + Send + Sync + 'static,
    {
        Self::raw(name, 1, true, move |ctx, args| func(ctx, args[0]).map(Some))
    }

    /// One JSON value in, one out (`(i64) -> i64`). Input that is not JSON fails the call.
    pub fn json<F>(name: impl Into<String>, func: F) -> Self
    where
        F: Fn(&CallContext, serde_json::Value) -> Result<serde_json::Value, HostError>
            + Send
            + Sync
            + 'static,
    {
        Self::bytes(name, move |ctx, input| {
            let value = serde_json::from_slice(input)
                .map_err(|e| HostError::new(format!("input is not JSON: {e}")))?;
            let output = func(ctx, value)?;
            serde_json::to_vec(&output).map_err(|e| HostError::new(e.to_string()))
        })
    }

    /// Any number of byte-string parameters; an optional result (`None` is handle 0).
    pub fn raw<F>(name: impl Into<String>, params: usize, returns: bool, func: F) -> Self
    where
        F: Fn(&CallContext, &[&[u8]]) -> Result<Option<Vec<u8>>, HostError> + Send + Sync + 'static,
    {
        Self {
            name: name.into(),
            params,
            returns,
            func: HostImpl::Sync(Arc::new(func)),
        }
    }

    /// An async host function: any number of byte-string parameters, an optional result.
    /// The future runs on the Tokio runtime the engine was built in; while it is pending
    /// the plug-in's call is suspended and its worker runs other calls. The plug-in sees
    /// an ordinary import. The call's deadline and cancellation still hold: past them the
    /// future is dropped and the call ends with `Timeout` or `Cancelled`.
    pub fn raw_async<F, Fut>(name: impl Into<String>, params: usize, returns: bool, func: F) -> Self
    where
        F: Fn(CallContext, Vec<Vec<u8>>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Option<Vec<u8>>, HostError>> + Send + 'static,
    {
        Self {
            name: name.into(),
            params,
            returns,
            func: HostImpl::Async(Arc::new(move |ctx, args| Box::pin(func(ctx, args)))),
        }
    }

    /// One byte string in, one out, answered by a future (see [`raw_async`](Self::raw_async)).
    pub fn bytes_async<F, Fut>(name: impl Into<String>, func: F) -> Self
    where
        F: Fn(CallContext, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Vec<u8>, HostError>> + Send + 'static,
    {
        let func = Arc::new(func);
        Self::raw_async(name, 1, true, move |ctx, mut args| {
            let input = args.pop().unwrap_or_default();
            let answer = func(ctx, input);
            async move { answer.await.map(Some) }
        })
    }

    /// One JSON value in, one out, answered by a future (see [`raw_async`](Self::raw_async)).
    /// Input that is not JSON fails the call.
    pub fn json_async<F, Fut>(name: impl Into<String>, func: F) -> Self
    where
        F: Fn(CallContext, serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<serde_json::Value, HostError>> + Send + 'static,
    {
        let func = Arc::new(func);
        Self::bytes_async(name, move |ctx, input| {
            let parsed = serde_json::from_slice(&input)
                .map_err(|e| HostError::new(format!("input is not JSON: {e}")));
            let answer = parsed.map(|value| func(ctx, value));
            async move {
                let output = answer?.await?;
                serde_json::to_vec(&output).map_err(|e| HostError::new(e.to_string()))
            }
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the function answers with a future.
    pub fn is_async(&self) -> bool {
        matches!(self.func, HostImpl::Async(_))
    }
}

/// Errors of a key-value store.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("key-value storage failed: {0}")]
    Storage(String),
}

/// Tenant-scoped key-value storage behind `kv_get`, `kv_set` and `kv_delete`.
pub trait KvStore: Send + Sync + 'static {
    fn get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    fn set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<(), KvError>;
    /// Returns whether the key existed.
    fn delete(&self, tenant: &str, key: &str) -> Result<bool, KvError>;
    /// Keys of one tenant starting with `prefix`, in order.
    fn keys(&self, tenant: &str, prefix: &str) -> Result<Vec<String>, KvError>;
}

/// A [`KvStore`] in process memory: the default, and what tests use.
#[derive(Debug, Default)]
pub struct MemoryKv {
    entries: Mutex<BTreeMap<(String, String), Vec<u8>>>,
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }
}

impl KvStore for MemoryKv {
    fn get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let entries = self.entries.lock();
        Ok(entries.get(&(tenant.to_owned(), key.to_owned())).cloned())
    }

    fn set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        let mut entries = self.entries.lock();
        entries.insert((tenant.to_owned(), key.to_owned()), value.to_vec());
        Ok(())
    }

    fn delete(&self, tenant: &str, key: &str) -> Result<bool, KvError> {
        let mut entries = self.entries.lock();
        Ok(entries
            .remove(&(tenant.to_owned(), key.to_owned()))
            .is_some())
    }

    fn keys(&self, tenant: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        let entries = self.entries.lock();
        Ok(entries
            .keys()
            .filter(|(t, k)| t == tenant && k.starts_with(prefix))
            .map(|(_, k)| k.clone())
            .collect())
    }
}

/// An event a plug-in published with `emit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmittedEvent {
    /// The routing subject, e.g. `payments.discount.sent`.
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// Errors of an event sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("event could not be published: {0}")]
    Rejected(String),
}

/// Where `emit` publishes. The workflow layer puts a durable inbox behind it.
pub trait EventSink: Send + Sync + 'static {
    fn publish(&self, ctx: &CallContext, event: EmittedEvent) -> Result<(), SinkError>;
}

/// An [`EventSink`] that keeps events in memory, for tests and the example.
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<(String, EmittedEvent)>>,
}

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything published so far, with the tenant that published it.
    pub fn events(&self) -> Vec<(String, EmittedEvent)> {
        self.events.lock().clone()
    }
}

impl EventSink for MemorySink {
    fn publish(&self, ctx: &CallContext, event: EmittedEvent) -> Result<(), SinkError> {
        self.events.lock().push((ctx.tenant.clone(), event));
        Ok(())
    }
}

/// Longest key the built-in KV functions accept.
pub const MAX_KV_KEY_BYTES: usize = 1024;
/// Largest value the built-in KV functions accept.
pub const MAX_KV_VALUE_BYTES: usize = 1024 * 1024;

fn kv_key(raw: &[u8]) -> Result<&str, HostError> {
    let key = std::str::from_utf8(raw).map_err(|_| HostError::new("key is not UTF-8"))?;
    if key.is_empty() || key.len() > MAX_KV_KEY_BYTES {
        return Err(HostError::new(format!(
            "key must be 1 to {MAX_KV_KEY_BYTES} bytes long"
        )));
    }
    Ok(key)
}

fn storage(e: KvError) -> HostError {
    HostError::new(e.to_string())
}

/// The built-in host functions over the given storage and sink.
pub fn builtins(kv: Arc<dyn KvStore>, sink: Arc<dyn EventSink>) -> Vec<HostFunction> {
    let get_kv = kv.clone();
    let set_kv = kv.clone();
    let delete_kv = kv;
    vec![
        // An absent key (or an empty value) is handle 0, as Extism's own `var_get`.
        HostFunction::raw("kv_get", 1, true, move |ctx, args| {
            get_kv.get(&ctx.tenant, kv_key(args[0])?).map_err(storage)
        }),
        HostFunction::raw("kv_set", 2, false, move |ctx, args| {
            if args[1].len() > MAX_KV_VALUE_BYTES {
                return Err(HostError::new(format!(
                    "value is larger than {MAX_KV_VALUE_BYTES} bytes"
                )));
            }
            set_kv
                .set(&ctx.tenant, kv_key(args[0])?, args[1])
                .map_err(storage)?;
            Ok(None)
        }),
        HostFunction::raw("kv_delete", 1, false, move |ctx, args| {
            delete_kv
                .delete(&ctx.tenant, kv_key(args[0])?)
                .map_err(storage)?;
            Ok(None)
        }),
        HostFunction::raw("emit", 1, false, move |ctx, args| {
            let event: EmittedEvent = serde_json::from_slice(args[0]).map_err(|e| {
                HostError::new(format!(
                    "event must be JSON {{\"type\": string, \"data\": any}}: {e}"
                ))
            })?;
            crate::subject::validate_subject(&event.event_type)
                .map_err(|e| HostError::new(format!("event type: {e}")))?;
            ctx.emit_budget
                .take(args[0].len() as u64)
                .map_err(HostError::new)?;
            match &ctx.emitted {
                Some(buffer) => buffer.lock().push(event),
                None => sink
                    .publish(ctx, event)
                    .map_err(|e| HostError::new(e.to_string()))?,
            }
            Ok(None)
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_kv_is_scoped_by_tenant() {
        let kv = MemoryKv::new();
        kv.set("a", "k", b"1").unwrap();
        assert_eq!(kv.get("b", "k").unwrap(), None);
        assert_eq!(kv.get("a", "k").unwrap(), Some(b"1".to_vec()));
        assert!(!kv.delete("b", "k").unwrap());
        assert_eq!(kv.keys("a", "").unwrap(), vec!["k".to_owned()]);
        assert!(kv.keys("b", "").unwrap().is_empty());
    }

    #[test]
    fn builtin_emit_rejects_events_without_a_type() {
        let sink = Arc::new(MemorySink::new());
        let functions = builtins(Arc::new(MemoryKv::new()), sink.clone());
        let emit = functions.iter().find(|f| f.name == "emit").unwrap();
        let ctx = CallContext::new("t");
        let HostImpl::Sync(emit) = &emit.func else {
            panic!("emit is a sync host function");
        };
        assert!(emit(&ctx, &[br#"{"data":1}"#]).is_err());
        assert!(emit(&ctx, &[br#"{"type":"","data":1}"#]).is_err());
        emit(&ctx, &[br#"{"type":"a.b","data":1}"#]).unwrap();
        assert_eq!(sink.events()[0].1.event_type, "a.b");
    }
}
