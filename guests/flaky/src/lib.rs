//! Fixture `flaky`: fails a given number of times, then succeeds, counting its
//! attempts in the host's key-value store so that the count survives the
//! instance being discarded between attempts. Used to test workflow retries.
//!
//! Host imports (module `extism:host/user`): `kv_get(key: i64) -> i64` (0 when
//! absent) and `kv_set(key: i64, value: i64)`.
//!
//! Export `attempt`: input is a JSON object
//! `{"key": string, "fail_times": n, "value": any}`. It adds 1 to the count
//! stored under `flaky:<key>` (decimal ASCII; absent = 0). While the new count
//! is at most `fail_times` it returns a guest error
//! `failing on purpose: attempt <count> of <fail_times> planned failures`;
//! after that it outputs `{"attempts": <count>, "value": <value>}`.
//! Input that is not such an object is a guest error starting with
//! `expected {"key"`.

use extism_pdk::*;
use serde_json::{json, Value};

#[host_fn("extism:host/user")]
extern "ExtismHost" {
    fn kv_set(key: &[u8], value: Vec<u8>);
}

mod raw {
    #[link(wasm_import_module = "extism:host/user")]
    extern "C" {
        pub fn kv_get(key: u64) -> u64;
    }
}

fn stored_count(key: &str) -> Result<u64, Error> {
    let key = Memory::from_bytes(key.as_bytes())?;
    let handle = unsafe { raw::kv_get(key.offset()) };
    key.free();
    if handle == 0 {
        return Ok(0);
    }
    let bytes = match Memory::find(handle) {
        Some(memory) => memory.to_vec(),
        None => return Ok(0),
    };
    if bytes.is_empty() {
        return Ok(0);
    }
    String::from_utf8_lossy(&bytes)
        .parse()
        .map_err(|_| Error::msg("stored attempt count is not a number"))
}

#[plugin_fn]
pub fn attempt(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let request: Value = serde_json::from_slice(&input).unwrap_or(Value::Null);
    let (Some(key), Some(fail_times)) = (
        request.get("key").and_then(Value::as_str),
        request.get("fail_times").and_then(Value::as_u64),
    ) else {
        return Err(WithReturnCode::new(
            Error::msg(r#"expected {"key": string, "fail_times": n, "value": any}"#),
            1,
        ));
    };
    let store_key = format!("flaky:{key}");
    let count = stored_count(&store_key)? + 1;
    unsafe { kv_set(store_key.as_bytes(), count.to_string().into_bytes())? };
    if count <= fail_times {
        return Err(WithReturnCode::new(
            Error::msg(format!(
                "failing on purpose: attempt {count} of {fail_times} planned failures"
            )),
            1,
        ));
    }
    let value = request.get("value").cloned().unwrap_or(Value::Null);
    Ok(serde_json::to_vec(&json!({ "attempts": count, "value": value }))?)
}
