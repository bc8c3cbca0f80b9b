//! Fixture `allocator`: grows guest linear memory, for memory-limit tests.
//!
//! Export `alloc_forever`: a raw export that allocates 1 MiB chunks
//! (`Vec<u8>` filled with 0xA5, so every page is touched) and keeps all of
//! them, forever. It ends only when the host refuses `memory.grow`: Rust's
//! allocator then reports allocation failure, which aborts with the wasm
//! `unreachable` trap (or fuel/timeout ends it first).
//!
//! Export `alloc_mib`: input is a JSON non-negative integer n; allocates n MiB
//! as n 1-MiB chunks filled with 0xA5 (all kept alive until the end of the
//! call, so the guest's memory really grows by about n MiB), and outputs n as
//! JSON. If memory cannot grow enough it traps the same way.
//!
//! Host imports: only `extism:host/env`.

use core::hint::black_box;
use extism_pdk::*;

const MIB: usize = 1 << 20;
const FILL: u8 = 0xA5;

fn chunk() -> Vec<u8> {
    black_box(vec![black_box(FILL); MIB])
}

#[no_mangle]
pub extern "C" fn alloc_forever() -> i32 {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        kept.push(chunk());
        black_box(&mut kept);
    }
}

#[plugin_fn]
pub fn alloc_mib(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let n = parse_count(&input)?;
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for _ in 0..n {
        kept.push(chunk());
        black_box(&mut kept);
    }
    let touched: u64 = kept.iter().map(|c| c[MIB - 1] as u64).sum();
    black_box(touched);
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
