//! Fixture `guest_error`: the ways a guest reports failure without trapping.
//!
//! Export `fail`: always fails: sets the Extism error message
//! `guest failed: <input as lossy UTF-8>` and returns code 1.
//!
//! Export `fail_code_only`: a raw export that sets no error message and no
//! output and returns code 3.
//!
//! Export `ok`: succeeds with output `ok` (input ignored).
//!
//! Host imports: only `extism:host/env`.

use extism_pdk::*;

#[plugin_fn]
pub fn fail(input: Vec<u8>) -> FnResult<()> {
    Err(WithReturnCode::new(
        Error::msg(format!(
            "guest failed: {}",
            String::from_utf8_lossy(&input)
        )),
        1,
    ))
}

#[no_mangle]
pub extern "C" fn fail_code_only() -> i32 {
    3
}

#[plugin_fn]
pub fn ok() -> FnResult<&'static str> {
    Ok("ok")
}
