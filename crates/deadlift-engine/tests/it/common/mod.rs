//! Helpers shared by the integration tests: fixtures, engines, and WAT.

#![allow(dead_code)]

use std::sync::Arc;

use deadlift_engine::{
    CallContext, CallError, CallOutput, Engine, EngineBuilder, Grant, HostFunction, ModuleId,
    NewModule,
};

pub const TENANT: &str = "acme";

/// The bytes of a prebuilt guest fixture (`guests/wasm/<name>.wasm`).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../guests/wasm/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

/// WAT text compiled to Wasm bytes.
pub fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("test WAT must parse")
}

/// An engine with the `reflect` host function, small enough to build per test.
pub fn builder() -> EngineBuilder {
    Engine::builder()
        .workers(2)
        .max_instances(64)
        .host_function(HostFunction::bytes("reflect", |_ctx, input| {
            Ok(input.to_vec())
        }))
}

pub fn engine() -> Engine {
    builder().build().expect("engine builds")
}

/// Registers fixture `name` for `tenant`.
pub fn add(engine: &Engine, tenant: &str, name: &str) -> ModuleId {
    add_bytes(engine, tenant, name, fixture(name))
}

pub fn add_bytes(engine: &Engine, tenant: &str, name: &str, bytes: Vec<u8>) -> ModuleId {
    engine
        .add_module(
            tenant,
            NewModule {
                name: name.to_owned(),
                bytes,
                ..NewModule::default()
            },
        )
        .expect("module registers")
        .id
}

pub fn ctx(tenant: &str) -> CallContext {
    CallContext::new(tenant)
}

/// A blocking call for `TENANT`.
pub fn call(
    engine: &Engine,
    module: &ModuleId,
    function: &str,
    input: &[u8],
    grant: &Grant,
) -> Result<CallOutput, CallError> {
    engine.call_blocking(module, function, input, grant, &ctx(TENANT))
}

/// The output of a call that must succeed, as text.
pub fn text(result: Result<CallOutput, CallError>) -> String {
    match result {
        Ok(out) => String::from_utf8(out.output).expect("UTF-8 output"),
        Err(e) => panic!("call failed: {e:?}"),
    }
}

pub fn shared<T>(value: T) -> Arc<T> {
    Arc::new(value)
}
