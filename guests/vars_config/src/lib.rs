//! Fixture `vars_config`: the Extism var store (plug-in state kept by the host
//! between calls) and the read-only config, through the kernel imports
//! `var_get`, `var_set` and `config_get`.
//!
//! Exports (all inputs and values are bytes; keys must be UTF-8):
//! - `greet`: reads config `greeting` (absent -> `Hello`), outputs
//!   `<greeting>, <input>!` (input as lossy UTF-8), and increments the var
//!   `count` (stored as a decimal ASCII string; absent or unparseable -> 0).
//! - `get_count`: outputs the var `count` as stored (absent -> `0`).
//! - `set_var`: input `key=value`; sets var `key` to the bytes after the
//!   first `=` (input without `=` is a guest error). An empty value is
//!   passed to `var_set` as an empty block, which Extism treats like
//!   absent. Outputs nothing.
//! - `get_var`: input key; outputs the var's bytes, or nothing if absent.
//! - `del_var`: input key; removes the var (`var_set(key, 0)` via
//!   `var::remove`). Outputs nothing.
//! - `get_config`: input key; outputs the config value's bytes, or nothing if
//!   absent.
//!
//! Host imports: only `extism:host/env`.

use extism_pdk::*;

fn key_str(input: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(input).map_err(|e| Error::msg(format!("key is not UTF-8: {e}")))
}

#[plugin_fn]
pub fn greet(input: Vec<u8>) -> FnResult<String> {
    let greeting = match config::get_memory("greeting")? {
        Some(mem) => String::from_utf8_lossy(&mem.to_vec()).into_owned(),
        None => "Hello".to_string(),
    };
    let count = var::get_memory("count")?
        .and_then(|m| String::from_utf8(m.to_vec()).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    var::set("count", count.wrapping_add(1).to_string())?;
    Ok(format!("{greeting}, {}!", String::from_utf8_lossy(&input)))
}

#[plugin_fn]
pub fn get_count() -> FnResult<Vec<u8>> {
    Ok(match var::get_memory("count")? {
        Some(mem) => mem.to_vec(),
        None => b"0".to_vec(),
    })
}

#[plugin_fn]
pub fn set_var(input: Vec<u8>) -> FnResult<()> {
    let eq = input
        .iter()
        .position(|&b| b == b'=')
        .ok_or_else(|| Error::msg("expected input of the form key=value"))?;
    let key = key_str(&input[..eq])?;
    var::set(key, &input[eq + 1..])?;
    Ok(())
}

#[plugin_fn]
pub fn get_var(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let key = key_str(&input)?;
    Ok(var::get_memory(key)?.map(|m| m.to_vec()).unwrap_or_default())
}

#[plugin_fn]
pub fn del_var(input: Vec<u8>) -> FnResult<()> {
    var::remove(key_str(&input)?)?;
    Ok(())
}

#[plugin_fn]
pub fn get_config(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let key = key_str(&input)?;
    Ok(config::get_memory(key)?.map(|m| m.to_vec()).unwrap_or_default())
}
