//! extism.zig - Deadlift's own declarations of the Extism host ABI for guests
//! written in Zig (no official Extism PDK is used): the kernel functions a
//! guest imports from the wasm module `extism:host/env`, as described in
//! docs/extism-abi.md, plus small helpers that copy bytes between the
//! guest's linear memory and Extism memory.
//!
//! Conventions (from the ABI): every offset, length and memory handle is a
//! u64; handle 0 means "none"; Extism memory is separate from guest memory,
//! so bytes cross only through the load/store/input_load calls. Only the
//! functions a module calls become imports.

const std = @import("std");

/// A handle to a block of Extism memory (0 = none).
pub const Handle = u64;

// --- input and output -------------------------------------------------------

/// Length of the call's input in bytes.
pub extern "extism:host/env" fn input_length() u64;
/// Handle of the block holding the input.
pub extern "extism:host/env" fn input_offset() Handle;
/// Input byte at index i (0 past the end).
pub extern "extism:host/env" fn input_load_u8(i: u64) u8;
/// Eight input bytes at index i, little-endian (0 past the end).
pub extern "extism:host/env" fn input_load_u64(i: u64) u64;
/// Make `len` bytes of block `h` the call's output.
pub extern "extism:host/env" fn output_set(h: Handle, len: u64) void;
/// Make block `h` (its bytes as text) the call's error message.
pub extern "extism:host/env" fn error_set(h: Handle) void;
/// Handle of the current error message (0 if none).
pub extern "extism:host/env" fn error_get() Handle;

// --- Extism memory ----------------------------------------------------------

/// New block of `len` bytes (alloc(0) returns 0).
pub extern "extism:host/env" fn alloc(len: u64) Handle;
/// Release a block.
pub extern "extism:host/env" fn free(h: Handle) void;
/// Used length of block `h` (0 if `h` does not start a live block).
pub extern "extism:host/env" fn length(h: Handle) u64;
/// Like `length` without the liveness check.
pub extern "extism:host/env" fn length_unsafe(h: Handle) u64;
/// Byte / eight little-endian bytes at an offset (0 when out of bounds).
pub extern "extism:host/env" fn load_u8(offs: u64) u8;
pub extern "extism:host/env" fn load_u64(offs: u64) u64;
/// Store a byte / eight little-endian bytes (dropped when out of bounds).
pub extern "extism:host/env" fn store_u8(offs: u64, v: u8) void;
pub extern "extism:host/env" fn store_u64(offs: u64, v: u64) void;

// --- config and vars --------------------------------------------------------

/// Config value for the key in block `key` (0 if absent). Frees `key`.
pub extern "extism:host/env" fn config_get(key: Handle) Handle;
/// Var value for the key in block `key` (0 if absent). Frees `key`.
pub extern "extism:host/env" fn var_get(key: Handle) Handle;
/// Set var `key` to block `value` (value 0 deletes it). Frees both.
pub extern "extism:host/env" fn var_set(key: Handle, value: Handle) void;

// --- HTTP -------------------------------------------------------------------

/// Perform the request described by the JSON in block `req` with body
/// block `body` (0 = none); returns the response body's handle.
pub extern "extism:host/env" fn http_request(req: Handle, body: Handle) Handle;
/// Status code of the last http_request.
pub extern "extism:host/env" fn http_status_code() i32;
/// Response headers of the last http_request as JSON (0 if none).
pub extern "extism:host/env" fn http_headers() Handle;

// --- logging (each frees the message block, even when filtered out) --------

pub extern "extism:host/env" fn log_trace(msg: Handle) void;
pub extern "extism:host/env" fn log_debug(msg: Handle) void;
pub extern "extism:host/env" fn log_info(msg: Handle) void;
pub extern "extism:host/env" fn log_warn(msg: Handle) void;
pub extern "extism:host/env" fn log_error(msg: Handle) void;
/// The host's current log level.
pub extern "extism:host/env" fn get_log_level() i32;

// --- helpers ----------------------------------------------------------------

/// Copies the call's input into guest memory.
pub fn inputRead(a: std.mem.Allocator) ![]u8 {
    const len: usize = @intCast(input_length());
    const buf = try a.alloc(u8, len);
    var i: usize = 0;
    while (i + 8 <= len) : (i += 8) {
        std.mem.writeInt(u64, buf[i..][0..8], input_load_u64(i), .little);
    }
    while (i < len) : (i += 1) buf[i] = input_load_u8(i);
    return buf;
}

/// Copies block `h` (0 reads as empty) into guest memory.
pub fn blockRead(a: std.mem.Allocator, h: Handle) ![]u8 {
    const len: usize = if (h == 0) 0 else @intCast(length(h));
    const buf = try a.alloc(u8, len);
    var i: usize = 0;
    while (i + 8 <= len) : (i += 8) {
        std.mem.writeInt(u64, buf[i..][0..8], load_u64(h + i), .little);
    }
    while (i < len) : (i += 1) buf[i] = load_u8(h + i);
    return buf;
}

/// A new block holding `bytes` (handle 0 when `bytes` is empty).
pub fn blockNew(bytes: []const u8) Handle {
    const h = alloc(bytes.len);
    var i: usize = 0;
    while (i + 8 <= bytes.len) : (i += 8) {
        store_u64(h + i, std.mem.readInt(u64, bytes[i..][0..8], .little));
    }
    while (i < bytes.len) : (i += 1) store_u8(h + i, bytes[i]);
    return h;
}

/// Sets the call's output to a copy of `bytes`.
pub fn setOutput(bytes: []const u8) void {
    output_set(blockNew(bytes), bytes.len);
}

/// Sets the guest error message and returns the export's error code (1).
pub fn fail(msg: []const u8) i32 {
    error_set(blockNew(msg));
    return 1;
}
