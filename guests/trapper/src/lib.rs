//! Fixture `trapper`: guest code that traps, for trap-handling tests.
//!
//! Export `trap`: a raw export that executes the wasm `unreachable`
//! instruction immediately (trap code: unreachable).
//!
//! Export `divide`: input is a JSON integer n in the i32 range (anything else
//! is a guest error, return code -1); outputs `100 / n` (integer division,
//! truncating toward zero) as a JSON number. For n = 0 the guest executes a
//! bare wasm `i32.div_s` on a zero divisor, so the trap is wasm's own
//! "integer divide by zero", not a Rust panic: Rust's division-by-zero check
//! is removed by telling the optimiser, with
//! `core::hint::assert_unchecked`, that the divisor is non-zero. (That is
//! formally undefined behaviour in Rust for n = 0; it is deliberate here, and
//! the release build is checked to contain `i32.div_s` with no guard before
//! it. Both operands go through `black_box` so the division cannot be folded.)
//!
//! Host imports: only `extism:host/env`.

use core::hint::black_box;
use extism_pdk::*;

#[no_mangle]
pub extern "C" fn trap() -> i32 {
    core::arch::wasm32::unreachable()
}

/// Divides with the raw wasm instruction: traps on a zero divisor.
#[inline(never)]
fn raw_div(dividend: i32, divisor: i32) -> i32 {
    let a = black_box(dividend);
    let b = black_box(divisor);
    // SAFETY: `a` is always 100 here, so the i32::MIN / -1 overflow case
    // cannot arise.
    unsafe { core::hint::assert_unchecked(a != i32::MIN) };
    // SAFETY: deliberately not upheld for b == 0: that is the point of this
    // fixture; on wasm32 the resulting bare `i32.div_s` traps.
    unsafe { core::hint::assert_unchecked(b != 0) };
    a / b
}

#[plugin_fn]
pub fn divide(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let n = match serde_json::from_slice::<serde_json::Value>(&input) {
        Ok(serde_json::Value::Number(n)) => n
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| Error::msg(format!("expected an integer in the i32 range, got {n}")))?,
        Ok(other) => {
            return Err(Error::msg(format!("expected a JSON number as input, got {other}")).into())
        }
        Err(e) => {
            return Err(Error::msg(format!(
                "expected a JSON number as input, got invalid JSON: {e}"
            ))
            .into())
        }
    };
    Ok(serde_json::to_vec(&raw_div(100, n))?)
}
