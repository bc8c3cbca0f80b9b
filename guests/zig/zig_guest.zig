//! zig_guest.zig - Deadlift's Extism guest fixture written in Zig, built for
//! wasm32-wasi as a reactor-style module (no `_start`, no `_initialize`: the
//! host calls exports by name) against our own ABI declarations in
//! extism.zig and wasi.zig (no official PDK). It shows that the executor
//! serves a non-Rust guest that uses both the Extism kernel and WASI.
//!
//! Exports (each `fn () i32`, 0 = success, 1 = guest error with a message
//! set through error_set); exact contracts in guests/README.md, "Fixtures in
//! other languages":
//!   greet        - config `greeting` + input name, log_info / log_warn
//!   count        - call counter kept in the Extism var `count`
//!   call_reflect - calls extism:host/user reflect(i64) -> i64
//!   read_file    - writes a line to WASI stdout, outputs the contents of the
//!                  file whose path is the input, found through WASI preopens
//! greet, count and call_reflect behave exactly like the C guest's.
//!
//! Guest memory: each export works in an arena over std.heap.wasm_allocator
//! that is released when the export returns.

const std = @import("std");
const extism = @import("extism.zig");
const wasi = @import("wasi.zig");

/// A panic (none is expected) is a wasm `unreachable` trap.
pub const panic = std.debug.no_panic;

/// The host function offered by the embedder: bytes in, bytes out.
extern "extism:host/user" fn reflect(input: extism.Handle) extism.Handle;

const Allocator = std.mem.Allocator;

/// Runs an export body in a fresh arena; running out of guest memory is a
/// guest error.
fn run(comptime body: fn (Allocator) anyerror!i32) i32 {
    var arena = std.heap.ArenaAllocator.init(std.heap.wasm_allocator);
    defer arena.deinit();
    return body(arena.allocator()) catch |err| switch (err) {
        error.OutOfMemory => extism.fail("out of memory"),
        else => extism.fail(@errorName(err)),
    };
}

fn concat(a: Allocator, parts: []const []const u8) ![]u8 {
    return std.mem.concat(a, u8, parts);
}

/// A non-empty all-digit decimal that fits in a u64, else null.
fn parseU64(s: []const u8) ?u64 {
    if (s.len == 0) return null;
    var v: u64 = 0;
    for (s) |c| {
        if (c < '0' or c > '9') return null;
        v = std.math.mul(u64, v, 10) catch return null;
        v = std.math.add(u64, v, c - '0') catch return null;
    }
    return v;
}

// --- greet ------------------------------------------------------------------

export fn greet() i32 {
    return run(greetBody);
}

fn greetBody(a: Allocator) !i32 {
    const name = try extism.inputRead(a);
    if (name.len == 0) {
        extism.log_warn(extism.blockNew("greet: empty input"));
        return extism.fail("greet: expected a non-empty name");
    }

    const gh = extism.config_get(extism.blockNew("greeting"));
    var greeting: []const u8 = try extism.blockRead(a, gh);
    if (gh != 0) extism.free(gh);
    if (greeting.len == 0) greeting = "Hello";

    extism.log_info(extism.blockNew(try concat(a, &.{ "greet: ", name })));
    extism.setOutput(try concat(a, &.{ greeting, ", ", name, "!" }));
    return 0;
}

// --- count ------------------------------------------------------------------

export fn count() i32 {
    return run(countBody);
}

fn countBody(a: Allocator) !i32 {
    const vh = extism.var_get(extism.blockNew("count"));
    const stored = try extism.blockRead(a, vh);
    if (vh != 0) extism.free(vh);

    var n: u64 = 0;
    if (stored.len != 0) {
        n = parseU64(stored) orelse return badCount();
        if (n == std.math.maxInt(u64)) return badCount();
    }
    n += 1;

    var digits: [20]u8 = undefined;
    const value = try std.fmt.bufPrint(&digits, "{d}", .{n});
    extism.var_set(extism.blockNew("count"), extism.blockNew(value));
    extism.setOutput(value);
    return 0;
}

fn badCount() i32 {
    return extism.fail("count: var count is not a decimal number");
}

// --- call_reflect -----------------------------------------------------------

export fn call_reflect() i32 {
    return run(callReflectBody);
}

fn callReflectBody(a: Allocator) !i32 {
    const arg = extism.blockNew(try extism.inputRead(a));
    const res = reflect(arg);
    if (res != 0) extism.output_set(res, extism.length(res));
    return 0;
}

// --- read_file (WASI) -------------------------------------------------------

export fn read_file() i32 {
    return run(readFileBody);
}

/// Writes all of `bytes` to stdout; errors are ignored (a host may give the
/// guest no stdout at all).
fn writeStdout(bytes: []const u8) void {
    var rest = bytes;
    while (rest.len > 0) {
        const iov = [1]wasi.Ciovec{.{ .buf = rest.ptr, .len = rest.len }};
        var n: usize = 0;
        if (wasi.fd_write(wasi.stdout, &iov, 1, &n) != 0 or n == 0) return;
        rest = rest[n..];
    }
}

const Preopen = struct { fd: wasi.Fd, rest: []const u8 };

/// The preopened directory whose name is the longest prefix of `path` ending
/// at a `/` boundary, and the rest of the path relative to it.
fn findPreopen(a: Allocator, path: []const u8) !?Preopen {
    var best: ?Preopen = null;
    var best_len: usize = 0;
    var fd: wasi.Fd = 3;
    while (fd < 1024) : (fd += 1) {
        var ps: wasi.Prestat = undefined;
        if (wasi.fd_prestat_get(fd, &ps) != 0) break; // badf: no more preopens
        if (ps.tag != wasi.preopentype_dir) continue;
        const raw = try a.alloc(u8, ps.dir_name_len);
        if (wasi.fd_prestat_dir_name(fd, raw.ptr, raw.len) != 0) continue;
        // Some hosts count a trailing NUL; a trailing '/' does not matter.
        const name = std.mem.trimRight(u8, raw, "\x00/");
        if (!std.mem.startsWith(u8, path, name)) continue;
        if (path.len > name.len and path[name.len] != '/') continue;
        if (best != null and name.len < best_len) continue;
        var rest = std.mem.trimLeft(u8, path[name.len..], "/");
        if (rest.len == 0) rest = ".";
        best = .{ .fd = fd, .rest = rest };
        best_len = name.len;
    }
    return best;
}

/// "<what><path>: errno <n>". (Built with bufPrint + concat: std.fmt's
/// allocating writer would pull in a WASI fd_filestat_get import.)
fn errnoMessage(a: Allocator, what: []const u8, path: []const u8, errno: wasi.Errno) ![]u8 {
    var digits: [5]u8 = undefined;
    const n = try std.fmt.bufPrint(&digits, "{d}", .{errno});
    return concat(a, &.{ what, path, ": errno ", n });
}

fn readFileBody(a: Allocator) !i32 {
    const path = try extism.inputRead(a);
    if (path.len == 0) return extism.fail("read_file: expected a path");
    writeStdout(try concat(a, &.{ "zig_guest: read_file ", path, "\n" }));

    const pre = try findPreopen(a, path) orelse
        return extism.fail(try concat(a, &.{ "read_file: no preopened directory for ", path }));

    var fd: wasi.Fd = 0;
    const open_err = wasi.path_open(pre.fd, wasi.lookup_symlink_follow, pre.rest.ptr, pre.rest.len, 0, wasi.right_fd_read, 0, 0, &fd);
    if (open_err != 0)
        return extism.fail(try errnoMessage(a, "read_file: cannot open ", path, open_err));
    defer _ = wasi.fd_close(fd);

    var buf = try a.alloc(u8, 4096);
    var len: usize = 0;
    while (true) {
        if (len == buf.len) buf = try a.realloc(buf, buf.len * 2);
        const iov = [1]wasi.Iovec{.{ .buf = buf.ptr + len, .len = buf.len - len }};
        var n: usize = 0;
        const read_err = wasi.fd_read(fd, &iov, 1, &n);
        if (read_err != 0)
            return extism.fail(try errnoMessage(a, "read_file: cannot read ", path, read_err));
        if (n == 0) break;
        len += n;
    }
    extism.setOutput(buf[0..len]);
    return 0;
}
