//! Fixture `stateful_counter`: state held in guest linear memory (a `static`
//! `AtomicU64`), not in Extism vars. It survives between calls only while the
//! host keeps the same wasm instance; used to prove that a host throws an
//! instance away after a trap.
//!
//! Export `next`: increments the counter and outputs the new value as a JSON
//! number (`1` on a fresh instance, then `2`, ...). Input ignored.
//!
//! Export `trap_after_increment`: a raw export that increments the counter
//! and then executes wasm `unreachable`. On a host that discards the trapped
//! instance, the next `next` returns `1` again.
//!
//! Host imports: only `extism:host/env`.

use core::sync::atomic::{AtomicU64, Ordering};
use extism_pdk::*;

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn bump() -> u64 {
    COUNTER.fetch_add(1, Ordering::SeqCst).wrapping_add(1)
}

#[plugin_fn]
pub fn next() -> FnResult<String> {
    Ok(bump().to_string())
}

#[no_mangle]
pub extern "C" fn trap_after_increment() -> i32 {
    core::hint::black_box(bump());
    core::arch::wasm32::unreachable()
}
