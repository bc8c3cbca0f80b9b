//! Deadlift: run other organisations' Extism plug-ins in process, fast and safely.
//!
//! This is the one crate an embedder reaches for. It re-exports the three layers,
//! each its own crate so that the boundaries hold:
//!
//! - [`deadlift_engine`]: the Wasm engine (registry, executor, grants, host functions);
//!   no storage, no HTTP serving, no workflows.
//! - [`deadlift_agent`]: the agent around it: storage, workflows and runs, federation,
//!   hooks.
//! - [`server`] (`deadlift_server`): the HTTP API over an agent.
//!
//! ```no_run
//! # async fn example(bytes: Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
//! use deadlift::{CallContext, Engine, Grant, NewModule};
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

#![forbid(unsafe_code)]

pub use deadlift_engine::{
    CallContext, CallError, CallOutput, CancelToken, EmittedEvent, Engine, EngineBuilder,
    EngineError, EngineStats, EventSink, Grant, HostError, HostFunction, KvStore, LogLevel,
    LogLine, MemoryKv, MemorySink, ModuleError, ModuleId, ModuleInfo, ModuleStore, NewModule,
    Registry,
};
pub use deadlift_engine::{engine, error, grant, host, registry, subject};

pub use deadlift_agent::{
    Agent, AgentBuilder, AgentError, CloudEvent, DEFAULT_TENANT, Runtime, V1_TENANT, V1Access,
    WorkflowError, WorkflowSpec,
};
pub use deadlift_agent::{
    agent, cluster, direct, federation, hooks, policy, releases, replay, store, tapes, workflow,
};

/// The HTTP server over an [`Agent`].
pub use deadlift_server as server;
