//! Fixture `looper`: CPU-bound work for fuel and timeout tests.
//!
//! Export `loop_forever`: spins forever without I/O or host calls (a raw
//! export; it never returns). `core::hint::black_box` keeps the compiler from
//! removing the loop, so only fuel exhaustion, an epoch/timeout interrupt or
//! cancellation can end the call.
//!
//! Export `spin`: input is a JSON non-negative integer n; runs n loop
//! iterations, each adding `3*i + 1` (wrapping u64) to an accumulator through
//! `black_box`, and outputs the accumulator as a JSON number, which equals
//! `n + 3*n*(n-1)/2` (mod 2^64). Bounded work, so it succeeds with enough fuel
//! or time and fails without.
//!
//! Host imports: only `extism:host/env` (`spin` reads input and sets output;
//! `loop_forever` uses neither).

use core::hint::black_box;
use extism_pdk::*;

#[no_mangle]
pub extern "C" fn loop_forever() -> i32 {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

#[plugin_fn]
pub fn spin(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let n = parse_count(&input)?;
    let mut acc: u64 = 0;
    let mut i: u64 = 0;
    while i < n {
        acc = black_box(acc.wrapping_add(i.wrapping_mul(3).wrapping_add(1)));
        i = black_box(i + 1);
    }
    Ok(serde_json::to_vec(&acc)?)
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
