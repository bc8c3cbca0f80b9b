//! Fixture `acme_satisfaction`: the showcase's plug-in on Acme's own agent
//! (`docs/overview.md`, "The showcase story"). A workflow runs it for each `discount.sent` event from
//! the payments agent; it aggregates the discounts into customer-satisfaction
//! counters in the host's key-value store, which Acme can query.
//!
//! Host imports (module `extism:host/user`): `kv_get(key: i64) -> i64`
//! (handle of the value bytes, 0 when absent) and `kv_set(key: i64, value: i64)`.
//! As in `kv_counter`, `kv_get` is a raw import and the guest checks for 0
//! before touching the handle; a non-zero handle to an empty block also
//! counts as 0.
//!
//! Export `record_discount`: input is the event data, a JSON object
//! `{"customer": str, "merchant": str, "discount_percent": int, "charge_id": str}`
//! (other members are ignored; only `customer` is used). It reads two counters
//! stored as decimal ASCII strings (absent = 0), `discounts:<customer>` and
//! `discounts` (the total; no customer key can equal it), then stores each plus 1 with `kv_set` (customer first).
//! Output (compact JSON, keys sorted):
//! `{"customer":<customer>,"total":<m>,"total_for_customer":<n>}`.
//!
//! Guest errors (return code -1): input that is not such an object →
//! `record_discount: expected {"customer": string, ...}`; a stored value that
//! is not a decimal number → `record_discount: value under key "<key>" is
//! not a decimal number: "<value>"` (both Rust-debug quoted). Both counters are read before either is written,
//! so an error leaves both unchanged.

use extism_pdk::*;
use serde_json::{json, Value};

#[host_fn("extism:host/user")]
extern "ExtismHost" {
    fn kv_set(key: &[u8], value: Vec<u8>);
}

mod raw {
    #[link(wasm_import_module = "extism:host/user")]
    extern "C" {
        /// Returns a handle to the value, or 0 when the key is absent.
        pub fn kv_get(key: u64) -> u64;
    }
}

const EXPECTED: &str = r#"record_discount: expected {"customer": string, "merchant": string, "discount_percent": integer, "charge_id": string}"#;

/// Reads the counter under `key` (absent or empty = 0).
fn read_count(key: &str) -> Result<u64, Error> {
    let key_mem = Memory::from_bytes(key)?;
    let handle = unsafe { raw::kv_get(key_mem.offset()) };
    key_mem.free();
    if handle == 0 {
        return Ok(0);
    }
    let bytes = Memory::find(handle).map(|m| m.to_vec()).unwrap_or_default();
    if bytes.is_empty() {
        return Ok(0);
    }
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            Error::msg(format!(
                "record_discount: value under key {key:?} is not a decimal number: {:?}",
                String::from_utf8_lossy(&bytes)
            ))
        })
}

fn write_count(key: &str, count: u64) -> Result<(), Error> {
    unsafe { kv_set(key.as_bytes(), count.to_string().into_bytes()) }
}

#[plugin_fn]
pub fn record_discount(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let event: Value = serde_json::from_slice(&input).unwrap_or(Value::Null);
    let text = |key: &str| event.get(key).and_then(Value::as_str);
    let (Some(customer), Some(_), Some(_), Some(_)) = (
        text("customer"),
        text("merchant"),
        event.get("discount_percent").and_then(Value::as_i64),
        text("charge_id"),
    ) else {
        return Err(Error::msg(EXPECTED).into());
    };
    let customer_key = format!("discounts:{customer}");
    let total_key = "discounts";
    let for_customer = read_count(&customer_key)? + 1;
    let total = read_count(total_key)? + 1;
    write_count(&customer_key, for_customer)?;
    write_count(total_key, total)?;
    Ok(serde_json::to_vec(&json!({
        "customer": customer,
        "total_for_customer": for_customer,
        "total": total,
    }))?)
}
