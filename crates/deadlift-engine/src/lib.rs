//! Deadlift's engine: run other organisations' Extism plug-ins in process, fast and
//! safely. An application that only wants to run plug-ins depends on this crate alone:
//! it knows nothing of databases, HTTP serving or workflows.
//!
//! The [`Engine`] is the entry point: it registers modules (validated by the
//! [`registry`]), compiles them once, and calls their functions under a [`Grant`] on
//! its own implementation of the Extism host ABI (the `executor`), with the
//! [`host`] functions the embedding application offers.
//!
//! ```no_run
//! # async fn example(bytes: Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
//! use deadlift_engine::{CallContext, Engine, Grant, NewModule};
//!
//! let engine = Engine::builder().build()?;
//! let module = engine.add_module("acme", NewModule {
//!     name: "add-ten".into(),
//!     bytes,
//!     ..NewModule::default()
//! })?;
//! let out = engine
//!     .call(&module.id, "_main", b"5", &Grant::default(), &CallContext::new("acme"))
//!     .await?;
//! assert_eq!(out.output, b"15");
//! # Ok(()) }
//! ```
//!
//! Host functions answer at once ([`HostFunction::json`], a closure) or later
//! ([`HostFunction::json_async`], a future run on the embedder's Tokio runtime). A call
//! waiting on an async one is suspended and gives its worker to other calls:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use deadlift_engine::{Engine, HostFunction};
//!
//! let engine = Engine::builder()
//!     .host_function(HostFunction::json("greeting", |ctx, _| {
//!         Ok(serde_json::json!(format!("hello, {}", ctx.tenant)))
//!     }))
//!     .host_function(HostFunction::json_async("lookup_purchases", |_ctx, customer| async move {
//!         // A database query, an internal service: milliseconds of waiting.
//!         tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//!         Ok(serde_json::json!({ "customer": customer, "purchases": [] }))
//!     }))
//!     .build()?;
//! # Ok(()) }
//! ```

pub mod code;
pub mod engine;
pub mod error;
pub(crate) mod executor;
pub mod grant;
pub mod host;
pub mod names;
pub mod registry;
pub mod subject;
pub mod tape;

pub use code::Code;
pub use engine::{Engine, EngineBuilder, EngineError, EngineStats, Fairness};
pub use error::CallError;
pub use executor::{CallOutput, LogLevel, LogLine};
pub use grant::Grant;
pub use host::{
    CallContext, CancelToken, EmittedEvent, EventSink, HostError, HostFunction, KvStore, MemoryKv,
    MemorySink,
};
pub use registry::{ModuleError, ModuleId, ModuleInfo, ModuleStore, NewModule, Registry};
