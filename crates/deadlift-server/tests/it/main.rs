//! Integration tests of the HTTP server: a real agent on a loopback port, driven over
//! HTTP. One test binary, one module per area; fixtures are the prebuilt guests under
//! `guests/wasm/`.

// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

mod cluster;
mod federation;
mod otlp;
mod releases;
mod replay;
mod server_api;
mod server_v1;
mod traces;
mod workflows;
