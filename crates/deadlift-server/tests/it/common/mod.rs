//! Helpers shared by the server's integration tests: fixtures and a running agent.

#![allow(dead_code)]

pub mod nats;
pub mod server;

/// The bytes of a prebuilt guest fixture (`guests/wasm/<name>.wasm`).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../guests/wasm/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}
