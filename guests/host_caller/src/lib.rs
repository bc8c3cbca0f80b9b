//! Fixture `host_caller`: calls a host function offered by the embedder.
//!
//! Host import `extism:host/user` `reflect(i64) -> i64`: takes a memory handle
//! holding bytes and returns a handle holding bytes (a test host typically
//! returns the same bytes in a new block).
//!
//! Export `call_reflect`: calls `reflect(input)` through extism-pdk's
//! `#[host_fn]` wrapper (the idiomatic path real plug-ins use) and outputs
//! exactly what it returned. A returned handle 0 reads as empty output: the
//! pdk asks the kernel `length(0)`, which is 0, and never panics on it.
//!
//! Export `call_reflect_n`: input is a JSON non-negative integer n; calls
//! `reflect` n times on one block holding `x`, then outputs n as JSON. Used
//! to measure the per-call cost of host functions. This loop uses the raw
//! import so that it can free each returned block (the pdk wrapper does not),
//! keeping memory flat for large n; a returned handle that is 0 or equal to
//! the argument handle is not freed.

use extism_pdk::*;

#[host_fn("extism:host/user")]
extern "ExtismHost" {
    fn reflect(input: Vec<u8>) -> Vec<u8>;
}

mod raw {
    #[link(wasm_import_module = "extism:host/user")]
    extern "C" {
        /// The same `reflect` import, seen as plain handles.
        #[link_name = "reflect"]
        pub fn reflect(input: u64) -> u64;
    }
}

#[plugin_fn]
pub fn call_reflect(input: Vec<u8>) -> FnResult<Vec<u8>> {
    Ok(unsafe { reflect(input)? })
}

#[plugin_fn]
pub fn call_reflect_n(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let n = parse_count(&input)?;
    let arg = Memory::from_bytes(b"x")?;
    for _ in 0..n {
        let out = unsafe { raw::reflect(arg.offset()) };
        if out != 0 && out != arg.offset() {
            unsafe { extism::free(out) };
        }
    }
    arg.free();
    Ok(serde_json::to_vec(&n)?)
}

/// Parses the whole input as a JSON non-negative integer.
fn parse_count(input: &[u8]) -> Result<u64, Error> {
    match serde_json::from_slice::<serde_json::Value>(input) {
        Ok(serde_json::Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| Error::msg(format!("expected a non-negative integer, got {n}"))),
        Ok(other) => Err(Error::msg(format!(
            "expected a JSON number as input, got {other}"
        ))),
        Err(e) => Err(Error::msg(format!(
            "expected a JSON number as input, got invalid JSON: {e}"
        ))),
    }
}
