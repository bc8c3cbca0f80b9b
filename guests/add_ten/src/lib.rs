//! Fixture `add_ten`: the simplest pure plug-in, a JSON number in, that number
//! plus 10 out. Used for basic call/round-trip tests (and, together with
//! `multiply_by_five`, for tests that load several distinct modules).
//!
//! Export `_main`: input is a JSON number. An integer yields an integer
//! (`5` -> `15`), a float yields a float (`1.5` -> `11.5`, `5.0` -> `15.0`).
//! Anything else (or an integer that would overflow) fails with a guest error
//! (return code -1, the extism-pdk default) whose message starts with
//! `expected a JSON number`.
//!
//! Host imports: only `extism:host/env` (input, output, alloc, error).

use extism_pdk::*;
use serde_json::{Number, Value};

const ADDEND: i64 = 10;

#[plugin_fn]
pub fn _main(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let n = parse_number(&input)?;
    let out = if let Some(i) = n.as_i64() {
        i.checked_add(ADDEND).map(Number::from)
    } else if let Some(u) = n.as_u64() {
        u.checked_add(ADDEND as u64).map(Number::from)
    } else {
        n.as_f64().and_then(|f| Number::from_f64(f + ADDEND as f64))
    };
    let out = out.ok_or_else(|| Error::msg(format!("result of {n} + {ADDEND} is out of range")))?;
    Ok(serde_json::to_vec(&out)?)
}

/// Parses the whole input as one JSON number.
fn parse_number(input: &[u8]) -> Result<Number, Error> {
    match serde_json::from_slice::<Value>(input) {
        Ok(Value::Number(n)) => Ok(n),
        Ok(other) => Err(Error::msg(format!(
            "expected a JSON number as input, got {other}"
        ))),
        Err(e) => Err(Error::msg(format!(
            "expected a JSON number as input, got invalid JSON: {e}"
        ))),
    }
}
