/*
 * extism.h - Deadlift's own declarations of the Extism host ABI for guests
 * written in C (no official Extism PDK is used). It declares the kernel
 * functions a guest imports from the wasm module `extism:host/env`, as
 * described in docs/extism-abi.md, plus two macros: one to import a host
 * function from `extism:host/user` and one to export a plug-in function.
 *
 * Conventions (all from the ABI): every offset, length and memory handle is
 * a 64-bit integer; handle 0 means "none"; handles point into Extism memory,
 * which is separate from the guest's own linear memory, so bytes move between
 * the two only through the load/store/input_load calls below.
 *
 * Only the functions a module actually calls become imports (the linker drops
 * unused declarations), so including this header costs nothing.
 */
#ifndef DEADLIFT_EXTISM_H
#define DEADLIFT_EXTISM_H

#include <stdint.h>

/* A handle to a block of Extism memory (0 = none). */
typedef uint64_t ExtismHandle;

#define EXTISM_ENV_IMPORT(name) \
    __attribute__((import_module("extism:host/env"), import_name(#name)))

/* Import host function `name` offered by the embedding application. */
#define EXTISM_USER_IMPORT(name) \
    __attribute__((import_module("extism:host/user"), import_name(#name)))

/* Export a plug-in function under `name`; its C type must be
 * `int32_t f(void)` (0 = success) or `void f(void)`. */
#define EXTISM_EXPORT(name) __attribute__((export_name(#name)))

/* --- input and output ---------------------------------------------------- */

/* Length of the call's input in bytes. */
EXTISM_ENV_IMPORT(input_length) uint64_t extism_input_length(void);
/* Handle of the block holding the input. */
EXTISM_ENV_IMPORT(input_offset) ExtismHandle extism_input_offset(void);
/* Input byte at index i (0 past the end). */
EXTISM_ENV_IMPORT(input_load_u8) int32_t extism_input_load_u8(uint64_t i);
/* Eight input bytes at index i, little-endian (0 past the end). */
EXTISM_ENV_IMPORT(input_load_u64) uint64_t extism_input_load_u64(uint64_t i);
/* Make `len` bytes of block `h` the call's output. */
EXTISM_ENV_IMPORT(output_set) void extism_output_set(ExtismHandle h, uint64_t len);
/* Make block `h` (its bytes as text) the call's error message. */
EXTISM_ENV_IMPORT(error_set) void extism_error_set(ExtismHandle h);
/* Handle of the current error message (0 if none). */
EXTISM_ENV_IMPORT(error_get) ExtismHandle extism_error_get(void);

/* --- Extism memory ------------------------------------------------------- */

/* New block of `len` bytes (alloc(0) returns 0). */
EXTISM_ENV_IMPORT(alloc) ExtismHandle extism_alloc(uint64_t len);
/* Release a block. */
EXTISM_ENV_IMPORT(free) void extism_free(ExtismHandle h);
/* Used length of block `h` (0 if `h` does not start a live block). */
EXTISM_ENV_IMPORT(length) uint64_t extism_length(ExtismHandle h);
/* Like extism_length without the liveness check. */
EXTISM_ENV_IMPORT(length_unsafe) uint64_t extism_length_unsafe(ExtismHandle h);
/* Byte / eight little-endian bytes at an Extism memory offset
 * (0 when out of bounds). */
EXTISM_ENV_IMPORT(load_u8) int32_t extism_load_u8(uint64_t offs);
EXTISM_ENV_IMPORT(load_u64) uint64_t extism_load_u64(uint64_t offs);
/* Store a byte / eight little-endian bytes (dropped when out of bounds). */
EXTISM_ENV_IMPORT(store_u8) void extism_store_u8(uint64_t offs, int32_t v);
EXTISM_ENV_IMPORT(store_u64) void extism_store_u64(uint64_t offs, uint64_t v);

/* --- config and vars ----------------------------------------------------- */

/* Config value for the key in block `key` (0 if absent). Frees `key`. */
EXTISM_ENV_IMPORT(config_get) ExtismHandle extism_config_get(ExtismHandle key);
/* Var value for the key in block `key` (0 if absent). Frees `key`. */
EXTISM_ENV_IMPORT(var_get) ExtismHandle extism_var_get(ExtismHandle key);
/* Set var `key` to block `value` (value 0 deletes it). Frees both. */
EXTISM_ENV_IMPORT(var_set) void extism_var_set(ExtismHandle key, ExtismHandle value);

/* --- HTTP ---------------------------------------------------------------- */

/* Perform the request described by the JSON in block `req`
 * ({"url":...,"method":...,"headers":{...}}) with body block `body`
 * (0 = no body). Returns the response body's handle. */
EXTISM_ENV_IMPORT(http_request)
ExtismHandle extism_http_request(ExtismHandle req, ExtismHandle body);
/* Status code of the last http_request. */
EXTISM_ENV_IMPORT(http_status_code) int32_t extism_http_status_code(void);
/* Response headers of the last http_request as a JSON object (0 if none). */
EXTISM_ENV_IMPORT(http_headers) ExtismHandle extism_http_headers(void);

/* --- logging (each frees the message block, even when filtered out) ------ */

EXTISM_ENV_IMPORT(log_trace) void extism_log_trace(ExtismHandle msg);
EXTISM_ENV_IMPORT(log_debug) void extism_log_debug(ExtismHandle msg);
EXTISM_ENV_IMPORT(log_info) void extism_log_info(ExtismHandle msg);
EXTISM_ENV_IMPORT(log_warn) void extism_log_warn(ExtismHandle msg);
EXTISM_ENV_IMPORT(log_error) void extism_log_error(ExtismHandle msg);
/* The host's current log level. */
EXTISM_ENV_IMPORT(get_log_level) int32_t extism_get_log_level(void);

#endif /* DEADLIFT_EXTISM_H */
