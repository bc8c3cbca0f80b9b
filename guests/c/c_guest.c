/*
 * c_guest.c - Deadlift's Extism guest fixture written in C, built for
 * wasm32-freestanding (no libc, no WASI, no official PDK) against our own ABI
 * header extism.h. It shows that the executor serves a non-Rust guest that
 * talks to the kernel imports directly: input/output, config, vars, a user
 * host function, logging, guest errors and HTTP.
 *
 * Exports (each `int32_t f(void)`, 0 = success, 1 = guest error with a
 * message set through error_set); the exact contracts are in
 * guests/README.md, "Fixtures in other languages":
 *   greet        - config `greeting` + input name, log_info / log_warn
 *   count        - call counter kept in the Extism var `count`
 *   call_reflect - calls extism:host/user reflect(i64) -> i64
 *   fetch        - {"url": ...} -> http_request -> {"status":N,"body":"..."}
 *
 * Guest memory: a bump allocator over the linear memory above __heap_base,
 * reset at the start of every export (nothing outlives a call in the guest;
 * the call counter lives in the host's var store). It grows memory as needed
 * and traps (wasm `unreachable`) if memory cannot grow.
 */
#include <stddef.h>
#include <stdint.h>

#include "extism.h"

/* The host function offered by the embedder: bytes in, bytes out. */
EXTISM_USER_IMPORT(reflect) ExtismHandle host_reflect(ExtismHandle input);

/* ---- guest memory ------------------------------------------------------- */

extern unsigned char __heap_base; /* provided by wasm-ld */
static uintptr_t heap_next;

static void heap_reset(void) { heap_next = (uintptr_t)&__heap_base; }

/* `n` bytes (8-aligned) from the bump heap; traps if memory cannot grow. */
static uint8_t *heap_alloc(uint64_t n) {
    uint64_t start = ((uint64_t)heap_next + 7u) & ~(uint64_t)7u;
    uint64_t end = start + n;
    if (n > 0xFFFFFFFFu || end > 0xFFFFFFFFu) __builtin_trap();
    uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        uint64_t pages = (end - have + 65535u) / 65536u;
        if (__builtin_wasm_memory_grow(0, (size_t)pages) == (size_t)-1) __builtin_trap();
    }
    heap_next = (uintptr_t)end;
    return (uint8_t *)(uintptr_t)start;
}

static void copy_bytes(uint8_t *dst, const uint8_t *src, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) dst[i] = src[i];
}

static uint64_t cstr_len(const char *s) {
    uint64_t n = 0;
    while (s[n]) n++;
    return n;
}

/* A byte string in guest memory. */
typedef struct {
    const uint8_t *ptr;
    uint64_t len;
} Bytes;

static Bytes cstr(const char *s) { return (Bytes){(const uint8_t *)s, cstr_len(s)}; }

static int bytes_eq(Bytes a, Bytes b) {
    if (a.len != b.len) return 0;
    for (uint64_t i = 0; i < a.len; i++)
        if (a.ptr[i] != b.ptr[i]) return 0;
    return 1;
}

/* An output buffer with a capacity fixed when it is created. */
typedef struct {
    uint8_t *buf;
    uint64_t len;
} Out;

static Out out_new(uint64_t cap) { return (Out){heap_alloc(cap), 0}; }
static void put(Out *o, Bytes b) {
    copy_bytes(o->buf + o->len, b.ptr, b.len);
    o->len += b.len;
}
static void put_c(Out *o, const char *s) { put(o, cstr(s)); }
static void put_byte(Out *o, uint8_t c) { o->buf[o->len++] = c; }
static Bytes out_bytes(Out o) { return (Bytes){o.buf, o.len}; }

/* ---- moving bytes between guest memory and Extism memory ---------------- */

/* Copies the call's input into guest memory. */
static Bytes input_read(void) {
    uint64_t len = extism_input_length();
    uint8_t *buf = heap_alloc(len + 8);
    uint64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t v = extism_input_load_u64(i);
        __builtin_memcpy(buf + i, &v, 8);
    }
    for (; i < len; i++) buf[i] = (uint8_t)extism_input_load_u8(i);
    return (Bytes){buf, len};
}

/* Copies Extism block `h` (0 reads as empty) into guest memory. */
static Bytes block_read(ExtismHandle h) {
    uint64_t len = h ? extism_length(h) : 0;
    uint8_t *buf = heap_alloc(len + 8);
    uint64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t v = extism_load_u64(h + i);
        __builtin_memcpy(buf + i, &v, 8);
    }
    for (; i < len; i++) buf[i] = (uint8_t)extism_load_u8(h + i);
    return (Bytes){buf, len};
}

/* A new Extism block holding `b` (handle 0 when `b` is empty). */
static ExtismHandle block_new(Bytes b) {
    ExtismHandle h = extism_alloc(b.len);
    uint64_t i = 0;
    for (; i + 8 <= b.len; i += 8) {
        uint64_t v;
        __builtin_memcpy(&v, b.ptr + i, 8);
        extism_store_u64(h + i, v);
    }
    for (; i < b.len; i++) extism_store_u8(h + i, b.ptr[i]);
    return h;
}

static void set_output(Bytes b) { extism_output_set(block_new(b), b.len); }

/* Sets the guest error message and returns the export's error code. */
static int32_t fail(const char *msg) {
    extism_error_set(block_new(cstr(msg)));
    return 1;
}

/* ---- decimal numbers ---------------------------------------------------- */

/* Writes `v` in decimal to `dst` (at least 20 bytes); returns the length. */
static uint64_t fmt_u64(uint8_t *dst, uint64_t v) {
    uint8_t tmp[20];
    uint64_t n = 0;
    do {
        tmp[n++] = (uint8_t)('0' + v % 10);
        v /= 10;
    } while (v);
    for (uint64_t i = 0; i < n; i++) dst[i] = tmp[n - 1 - i];
    return n;
}

/* Parses a non-empty all-digit decimal that fits in a u64; 0 on failure. */
static int parse_u64(Bytes b, uint64_t *out) {
    uint64_t v = 0;
    if (b.len == 0) return 0;
    for (uint64_t i = 0; i < b.len; i++) {
        uint8_t c = b.ptr[i];
        if (c < '0' || c > '9') return 0;
        uint64_t d = (uint64_t)(c - '0');
        if (v > (UINT64_MAX - d) / 10) return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

/* ---- exports ------------------------------------------------------------ */

/* greet: "<greeting>, <name>!" with config `greeting` (absent/empty: Hello). */
EXTISM_EXPORT(greet) int32_t greet(void) {
    heap_reset();
    Bytes name = input_read();
    if (name.len == 0) {
        extism_log_warn(block_new(cstr("greet: empty input")));
        return fail("greet: expected a non-empty name");
    }

    ExtismHandle gh = extism_config_get(block_new(cstr("greeting")));
    Bytes greeting = block_read(gh);
    if (gh) extism_free(gh);
    if (greeting.len == 0) greeting = cstr("Hello");

    Out line = out_new(7 + name.len);
    put_c(&line, "greet: ");
    put(&line, name);
    extism_log_info(block_new(out_bytes(line)));

    Out out = out_new(greeting.len + 2 + name.len + 1);
    put(&out, greeting);
    put_c(&out, ", ");
    put(&out, name);
    put_byte(&out, '!');
    set_output(out_bytes(out));
    return 0;
}

/* count: var `count` + 1, stored back and output in decimal. */
EXTISM_EXPORT(count) int32_t count(void) {
    heap_reset();
    ExtismHandle vh = extism_var_get(block_new(cstr("count")));
    Bytes stored = block_read(vh);
    if (vh) extism_free(vh);

    uint64_t n = 0;
    if (stored.len != 0 && (!parse_u64(stored, &n) || n == UINT64_MAX))
        return fail("count: var count is not a decimal number");
    n += 1;

    uint8_t digits[20];
    Bytes value = {digits, fmt_u64(digits, n)};
    extism_var_set(block_new(cstr("count")), block_new(value));
    set_output(value);
    return 0;
}

/* call_reflect: output = what reflect returns for a copy of the input. */
EXTISM_EXPORT(call_reflect) int32_t call_reflect(void) {
    heap_reset();
    ExtismHandle arg = block_new(input_read());
    ExtismHandle res = host_reflect(arg);
    if (res) extism_output_set(res, extism_length(res));
    return 0;
}

/* ---- a small JSON scanner for fetch's input ----------------------------- */

typedef struct {
    const uint8_t *p, *end;
} Scan;

static int is_ws(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static void skip_ws(Scan *s) {
    while (s->p < s->end && is_ws(*s->p)) s->p++;
}

static int eat(Scan *s, uint8_t c) {
    skip_ws(s);
    if (s->p < s->end && *s->p == c) {
        s->p++;
        return 1;
    }
    return 0;
}

/* A JSON string literal; *raw gets its contents with escapes left as they
 * are (so it can be pasted into another JSON string unchanged). */
static int string_lit(Scan *s, Bytes *raw) {
    if (!eat(s, '"')) return 0;
    const uint8_t *start = s->p;
    while (s->p < s->end) {
        uint8_t c = *s->p;
        if (c == '"') {
            *raw = (Bytes){start, (uint64_t)(s->p - start)};
            s->p++;
            return 1;
        }
        if (c < 0x20) return 0;
        if (c == '\\') {
            s->p++;
            if (s->p >= s->end) return 0;
        }
        s->p++;
    }
    return 0;
}

/* Skips one JSON value: strings are scanned, brackets balanced, scalars taken
 * up to the next delimiter (not validated further). */
static int skip_value(Scan *s) {
    Bytes ignored;
    skip_ws(s);
    if (s->p >= s->end) return 0;
    if (*s->p == '"') return string_lit(s, &ignored);
    if (*s->p == '{' || *s->p == '[') {
        int depth = 0;
        while (s->p < s->end) {
            uint8_t c = *s->p;
            if (c == '"') {
                if (!string_lit(s, &ignored)) return 0;
                continue;
            }
            if (c == '{' || c == '[') depth++;
            if (c == '}' || c == ']') {
                depth--;
                if (depth == 0) {
                    s->p++;
                    return 1;
                }
            }
            s->p++;
        }
        return 0;
    }
    const uint8_t *start = s->p;
    while (s->p < s->end && *s->p != ',' && *s->p != '}' && *s->p != ']' && !is_ws(*s->p))
        s->p++;
    return s->p > start;
}

/* The raw string value of the first top-level member "url" of a JSON object. */
static int find_url(Bytes in, Bytes *url) {
    Scan s = {in.ptr, in.ptr + in.len};
    if (!eat(&s, '{')) return 0;
    for (;;) {
        Bytes key;
        if (!string_lit(&s, &key) || !eat(&s, ':')) return 0;
        if (bytes_eq(key, cstr("url"))) return string_lit(&s, url);
        if (!skip_value(&s) || !eat(&s, ',')) return 0;
    }
}

/* fetch: GET the input's url through the host, output status and body. */
EXTISM_EXPORT(fetch) int32_t fetch(void) {
    static const char hex[] = "0123456789abcdef";
    heap_reset();
    Bytes url;
    if (!find_url(input_read(), &url))
        return fail("fetch: expected a JSON object with a string member \"url\"");

    Out req = out_new(url.len + 64);
    put_c(&req, "{\"url\":\"");
    put(&req, url);
    put_c(&req, "\",\"method\":\"GET\",\"headers\":{}}");
    ExtismHandle resp = extism_http_request(block_new(out_bytes(req)), 0);
    int32_t status = extism_http_status_code();
    Bytes body = block_read(resp);
    if (resp) extism_free(resp);

    Out out = out_new(body.len * 6 + 64);
    put_c(&out, "{\"status\":");
    int64_t st = status;
    if (st < 0) {
        put_byte(&out, '-');
        st = -st;
    }
    out.len += fmt_u64(out.buf + out.len, (uint64_t)st);
    put_c(&out, ",\"body\":\"");
    for (uint64_t i = 0; i < body.len; i++) {
        uint8_t c = body.ptr[i];
        if (c == '"' || c == '\\') {
            put_byte(&out, '\\');
            put_byte(&out, c);
        } else if (c == '\n') {
            put_c(&out, "\\n");
        } else if (c == '\r') {
            put_c(&out, "\\r");
        } else if (c == '\t') {
            put_c(&out, "\\t");
        } else if (c < 0x20) {
            put_c(&out, "\\u00");
            put_byte(&out, (uint8_t)hex[c >> 4]);
            put_byte(&out, (uint8_t)hex[c & 15]);
        } else {
            put_byte(&out, c);
        }
    }
    put_c(&out, "\"}");
    set_output(out_bytes(out));
    return 0;
}
