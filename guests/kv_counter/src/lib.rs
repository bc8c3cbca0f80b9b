//! Fixture `kv_counter`: a counter kept by the *host* in a key-value store,
//! reached through three host functions. Used to test host functions with
//! shared host-side state and the "nothing found" handle 0.
//!
//! Host imports (module `extism:host/user`):
//! - `kv_get(key: i64) -> i64`: handle of the value bytes, or 0 when the key
//!   is absent;
//! - `kv_set(key: i64, value: i64)`: no result;
//! - `kv_delete(key: i64)`: no result.
//!
//! `kv_get` is declared as a raw import returning the handle as `u64`, and the
//! guest checks for 0 *before* touching the handle, so an absent key never
//! reaches the kernel (`length`/`load`) and never panics. A non-zero handle
//! whose block is empty also counts as 0. `kv_set` and `kv_delete` use
//! extism-pdk's `#[host_fn]`.
//!
//! Counts are stored as decimal ASCII strings (e.g. `"3"`). Every export takes
//! the key as its input (UTF-8; non-UTF-8 input is a guest error):
//! - `increment`: reads the count (absent = 0), adds 1, stores it with
//!   `kv_set`, outputs the new count as a JSON number;
//! - `get`: outputs the current count as a JSON number (0 if absent);
//! - `reset`: calls `kv_delete(key)`, outputs nothing.
//!
//! A stored value that is not a decimal number is a guest error.

use extism_pdk::*;

#[host_fn("extism:host/user")]
extern "ExtismHost" {
    fn kv_set(key: &[u8], value: Vec<u8>);
    fn kv_delete(key: &[u8]);
}

mod raw {
    #[link(wasm_import_module = "extism:host/user")]
    extern "C" {
        /// Returns a handle to the value, or 0 when the key is absent.
        pub fn kv_get(key: u64) -> u64;
    }
}

/// Looks `key` up on the host; `None` when the host returned handle 0.
fn kv_get(key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
    let key_mem = Memory::from_bytes(key)?;
    let handle = unsafe { raw::kv_get(key_mem.offset()) };
    key_mem.free();
    if handle == 0 {
        return Ok(None);
    }
    // `find` asks the kernel for the block's length; an empty block is None.
    Ok(Some(Memory::find(handle).map(|m| m.to_vec()).unwrap_or_default()))
}

fn read_count(key: &str) -> Result<u64, Error> {
    match kv_get(key.as_bytes())? {
        None => Ok(0),
        Some(raw) if raw.is_empty() => Ok(0),
        Some(raw) => std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                Error::msg(format!(
                    "value under key {key:?} is not a decimal number: {:?}",
                    String::from_utf8_lossy(&raw)
                ))
            }),
    }
}

#[plugin_fn]
pub fn increment(key: String) -> FnResult<Vec<u8>> {
    let next = read_count(&key)?.wrapping_add(1);
    unsafe { kv_set(key.as_bytes(), next.to_string().into_bytes())? };
    Ok(serde_json::to_vec(&next)?)
}

#[plugin_fn]
pub fn get(key: String) -> FnResult<Vec<u8>> {
    Ok(serde_json::to_vec(&read_count(&key)?)?)
}

#[plugin_fn]
pub fn reset(key: String) -> FnResult<()> {
    unsafe { kv_delete(key.as_bytes())? };
    Ok(())
}
