//! Fixture `emitter`: sends events to the host through a host function with
//! no result. Used to test host functions that only consume guest data.
//!
//! Host import `extism:host/user` `emit(event_json: i64)`: no result.
//!
//! Export `emit_event`: input is a JSON object `{"type":"...","data":...}`.
//! If the input is not a JSON object with a string `type` it fails with a
//! guest error (return code -1) and `emit` is not called. Otherwise it calls
//! `emit` with the input bytes unchanged and outputs `{"emitted":"<type>"}`.

use extism_pdk::*;
use serde_json::Value;

#[host_fn("extism:host/user")]
extern "ExtismHost" {
    fn emit(event_json: &[u8]);
}

#[plugin_fn]
pub fn emit_event(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let event: Value = serde_json::from_slice(&input)
        .map_err(|e| Error::msg(format!("event is not valid JSON: {e}")))?;
    let kind = match event.get("type") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(Error::msg(
                "event must be a JSON object with a string field `type`",
            )
            .into())
        }
    };
    unsafe { emit(input.as_slice())? };
    Ok(serde_json::to_vec(&serde_json::json!({ "emitted": kind }))?)
}
