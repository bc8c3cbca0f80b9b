//! Fixture `fetcher`: one outbound HTTP GET per call, for tests that count how often a
//! workflow step really ran (the server they call counts).
//!
//! Export `fetch`: input `{"url": "..."}` → `http_request` (GET) → output
//! `{"status": N, "body": <the answer's JSON, or its text>}`.
//!
//! It calls the raw `http_request` import: the PDK's `http` feature would change every
//! other fixture of this workspace (features are unified across it).
//!
//! Host imports: only `extism:host/env`.

use extism_pdk::*;
use serde_json::{json, Value};

#[plugin_fn]
pub fn fetch(Json(input): Json<Value>) -> FnResult<Json<Value>> {
    let url = input["url"]
        .as_str()
        .ok_or_else(|| Error::msg("input must be {\"url\": \"...\"}"))?;
    let request = Memory::from_bytes(json!({ "url": url, "method": "GET" }).to_string())?;
    // SAFETY: both are Extism kernel calls on blocks this call owns.
    let (answer, status) = unsafe {
        let offset = extism::http_request(request.offset(), 0);
        (Memory::find(offset), extism::http_status_code())
    };
    let bytes = answer.map(|memory| memory.to_vec()).unwrap_or_default();
    let body = serde_json::from_slice::<Value>(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Json(json!({ "status": status, "body": body })))
}
