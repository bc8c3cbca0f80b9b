//! Deadlift's agent: an engine wired to durable state. It holds tenants and tokens,
//! workflows, events and durable runs, federation with other agents, and the hooks an
//! embedding application declares. The [`Agent`] façade is what the server and
//! embedders drive; it knows no HTTP serving.

#![forbid(unsafe_code)]

pub mod agent;
pub mod clock;
pub mod cluster;
pub mod direct;
pub mod federation;
pub mod hooks;
mod keeping;
pub mod manifest;
pub mod policy;
pub mod releases;
pub mod replay;
mod schema;
mod shadow;
pub mod store;
pub mod tapes;
pub mod telemetry;
pub mod workflow;

pub use agent::{Agent, AgentBuilder, AgentError, DEFAULT_TENANT, V1_TENANT, V1Access};
pub use workflow::{CloudEvent, Runtime, WorkflowError, WorkflowSpec};
