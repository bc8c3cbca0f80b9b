//! Fixture `echo`: byte-exact round trip of input to output, plus an empty
//! export for measuring the fixed cost of a call.
//!
//! Export `echo`: output = input, byte for byte (any bytes, including empty
//! and non-UTF-8).
//!
//! Export `noop`: a raw export (`extern "C" fn noop() -> i32 { 0 }`, no
//! extism-pdk wrapper) that reads no input, sets no output, calls no host
//! function and returns 0. It is the benchmark "call floor".
//!
//! Host imports: only `extism:host/env`.

use extism_pdk::*;

#[plugin_fn]
pub fn echo(input: Vec<u8>) -> FnResult<Vec<u8>> {
    Ok(input)
}

/// Does nothing and succeeds. Deliberately bypasses `#[plugin_fn]` so the call
/// touches no Extism kernel function at all.
#[no_mangle]
pub extern "C" fn noop() -> i32 {
    0
}
