//! Fixture `count_vowels`: exercises config, vars (state that survives
//! between calls on one plug-in) and arbitrary-byte input, in the shape of
//! Extism's own well-known `count_vowels` demo.
//!
//! Export `count_vowels`: input is any bytes (possibly empty, possibly not
//! UTF-8). Counts the input *bytes* that appear in the vowel set. The vowel set
//! is the config value `vowels` if present, else `aeiouAEIOU`. A running total
//! across calls is kept in the Extism var `total`, stored as a decimal ASCII
//! string (e.g. `"12"`); an absent var counts as 0, an unparseable one is a
//! guest error. Output is JSON with keys in this order:
//! `{"count":N,"total":T,"vowels":"..."}` (`vowels` is the set used, decoded
//! as lossy UTF-8).
//!
//! Host imports: only `extism:host/env` (including `config_get`, `var_get`,
//! `var_set`).

use extism_pdk::*;

const DEFAULT_VOWELS: &[u8] = b"aeiouAEIOU";

#[plugin_fn]
pub fn count_vowels(input: Vec<u8>) -> FnResult<Vec<u8>> {
    // Read config as raw bytes: `config::get` would panic on a non-UTF-8 value.
    let vowels = match config::get_memory("vowels")? {
        Some(mem) => mem.to_vec(),
        None => DEFAULT_VOWELS.to_vec(),
    };

    let count = input.iter().filter(|b| vowels.contains(b)).count() as u64;

    let previous = match var::get_memory("total")? {
        None => 0,
        Some(mem) => {
            let raw = mem.to_vec();
            std::str::from_utf8(&raw)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::msg(format!(
                        "var `total` is not a decimal number: {:?}",
                        String::from_utf8_lossy(&raw)
                    ))
                })?
        }
    };
    let total = previous.wrapping_add(count);
    var::set("total", total.to_string())?;

    let out = serde_json::json!({
        "count": count,
        "total": total,
        "vowels": String::from_utf8_lossy(&vowels),
    });
    Ok(serde_json::to_vec(&out)?)
}
