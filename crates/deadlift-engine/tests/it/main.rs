//! Integration tests of the `deadlift` library: one test binary, one module per area.
//! Fixtures are the prebuilt guests under `guests/wasm/`; tiny cases are inline WAT.

// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

mod cache;
mod differential;
mod engine_calls;
mod fairness;
mod isolation;
mod limits;
mod logs;
mod outbound;
mod registry;
mod suspend;
mod tapes;
mod wasi;
