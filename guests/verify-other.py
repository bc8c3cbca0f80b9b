#!/usr/bin/env python3
"""Check the non-Rust guest fixtures under the real Extism runtime.

Developer tool, not run by CI. It loads guests/wasm/c_guest.wasm and
guests/wasm/zig_guest.wasm with the Python Extism SDK from PyPI (`extism`,
which ships a prebuilt libextism, so nothing is compiled) and checks every
export's contract as documented in guests/README.md, "Fixtures in other
languages": greet (config, logs, guest error), count (Extism var across
calls), call_reflect (host function `extism:host/user::reflect`), the C
guest's fetch (http_request against a local `python3 -m http.server` on
127.0.0.1, allowed_hosts) and the Zig guest's read_file (WASI preopens via
allowed_paths, stdout via EXTISM_ENABLE_WASI_OUTPUT).

Usage: python3 guests/verify-other.py
If `extism` cannot be imported, the script creates a virtualenv with the
pinned SDK (extism and extism-sys) in
${DEADLIFT_TOOLCHAINS:-~/.cache/deadlift-toolchains}/extism-py-<version>
(PyPI access needed once) and re-runs itself with it. Prints one line per
check and ends with "N passed, N failed"; exits 1 if any check failed.

Not covered: count's error for a stored var that is not a decimal number
(the SDK offers no way to set a plug-in's var from the host).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

EXTISM_PY_VERSION = "1.1.1"
EXTISM_SYS_VERSION = "1.41.0"  # the prebuilt libextism the SDK wraps
HERE = pathlib.Path(__file__).resolve().parent
WASM = HERE / "wasm"
CHILD_FLAG = "--read-file-child"

os.environ.setdefault("RUST_LIB_BACKTRACE", "0")  # no backtraces in SDK logs


def import_extism_or_reexec():
    try:
        import extism  # noqa: F401
        return
    except ImportError:
        pass
    if os.environ.get("DEADLIFT_VERIFY_REEXEC"):
        sys.exit("verify-other.py: extism still not importable after installing it")
    cache = pathlib.Path(os.environ.get("DEADLIFT_TOOLCHAINS")
                         or pathlib.Path.home() / ".cache" / "deadlift-toolchains")
    venv = cache / ("extism-py-" + EXTISM_PY_VERSION)
    py = venv / "bin" / "python"
    if not py.exists():
        print("verify-other.py: creating %s" % venv, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check",
                        "extism==" + EXTISM_PY_VERSION,
                        "extism-sys==" + EXTISM_SYS_VERSION], check=True)
    os.environ["DEADLIFT_VERIFY_REEXEC"] = "1"
    os.execv(str(py), [str(py), str(pathlib.Path(__file__).resolve())] + sys.argv[1:])


import_extism_or_reexec()
import extism  # noqa: E402

# --- host side --------------------------------------------------------------

REFLECTED = []  # every byte string the guest passed to reflect


@extism.host_fn(name="reflect", namespace="extism:host/user",
                signature=([extism.ValType.I64], [extism.ValType.I64]))
def reflect(plugin, params, results, *_user_data):
    data = plugin.input_bytes(params[0])
    REFLECTED.append(bytes(data))
    plugin.return_bytes(results[0], bytes(data))


LOG_LINES = []
LOGGER = extism.set_log_custom(LOG_LINES.append, "info")


def drain_logs():
    LOGGER.drain()
    lines = list(LOG_LINES)
    LOG_LINES.clear()
    return lines


def load(name, config=None, wasi=False, allowed_hosts=None, allowed_paths=None):
    manifest = {"wasm": [{"data": (WASM / (name + ".wasm")).read_bytes()}]}
    if config is not None:
        manifest["config"] = config
    if allowed_hosts is not None:
        manifest["allowed_hosts"] = allowed_hosts
    if allowed_paths is not None:
        manifest["allowed_paths"] = allowed_paths
    return extism.Plugin(manifest, wasi=wasi, functions=[reflect])


def call_error(plugin, func, data):
    """The error message of a call that must fail."""
    try:
        out = plugin.call(func, data)
    except extism.Error as e:
        return str(e)
    raise AssertionError("call %s(%r) succeeded with %r" % (func, data, out))


def expect(actual, wanted):
    if actual != wanted:
        raise AssertionError("got %r, want %r" % (actual, wanted))


# --- checks -------------------------------------------------------------------

PASSED, FAILED = [], []


def check(name, fn):
    try:
        note = fn()
    except Exception as e:  # report and go on
        FAILED.append(name)
        print("FAIL %s: %s: %s" % (name, type(e).__name__, e))
        return
    PASSED.append(name)
    print("PASS %s%s" % (name, "  [%s]" % note if note else ""))


def common_checks(guest, wasi):
    def p(**kw):
        return load(guest, wasi=wasi, **kw)

    def greet_default():
        pl = p()
        drain_logs()
        expect(pl.call("greet", "World"), b"Hello, World!")
        logs = drain_logs()
        if not any(" INFO extism::pdk: greet: World" in l for l in logs):
            raise AssertionError("no info log 'greet: World' in %r" % logs)

    def greet_config():
        expect(p(config={"greeting": "Howdy"}).call("greet", "World"), b"Howdy, World!")

    def greet_empty_config():
        expect(p(config={"greeting": ""}).call("greet", "x"), b"Hello, x!")

    def greet_error():
        pl = p()
        drain_logs()
        expect(call_error(pl, "greet", b""), "greet: expected a non-empty name")
        logs = drain_logs()
        if not any(" WARN extism::pdk: greet: empty input" in l for l in logs):
            raise AssertionError("no warn log 'greet: empty input' in %r" % logs)
        # The instance keeps working after a guest error.
        expect(pl.call("greet", "again"), b"Hello, again!")

    def count():
        pl = p()
        got = [pl.call("count", b"ignored") for _ in range(3)]
        expect(got, [b"1", b"2", b"3"])
        expect(p().call("count", b""), b"1")  # vars are per plug-in
        expect(pl.call("count", b""), b"4")

    def call_reflect():
        pl = p()
        data = bytes(range(256)) + b"tail"
        REFLECTED.clear()
        expect(pl.call("call_reflect", data), data)
        expect(REFLECTED, [data])
        REFLECTED.clear()
        expect(pl.call("call_reflect", b""), b"")
        expect(REFLECTED, [b""])

    def no_start():
        pl = p()
        for f in ("_start", "_initialize"):
            if pl.function_exists(f):
                raise AssertionError("exports %s" % f)
        for f in ("greet", "count", "call_reflect"):
            if not pl.function_exists(f):
                raise AssertionError("does not export %s" % f)

    for name, fn in [("greet default greeting + log_info", greet_default),
                     ("greet config greeting", greet_config),
                     ("greet empty config value -> Hello", greet_empty_config),
                     ("greet empty input -> guest error + log_warn", greet_error),
                     ("count var across calls", count),
                     ("call_reflect host function", call_reflect),
                     ("exports, no _start/_initialize", no_start)]:
        check("%s: %s" % (guest, name), fn)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def c_fetch_checks(tmp):
    site = tmp / "site"
    site.mkdir()
    body = 'Hi "there"\n\ttab \\ back\x01 \u00fcn\u00efcode\r\n'
    (site / "hello.txt").write_bytes(body.encode())
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
         "--directory", str(site)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("http.server did not start")
                time.sleep(0.1)
        base = "http://127.0.0.1:%d" % port

        def p(hosts=("127.0.0.1",)):
            return load("c_guest", allowed_hosts=list(hosts) if hosts is not None else None)

        def fetch(pl, doc):
            raw = pl.call("fetch", doc if isinstance(doc, str) else json.dumps(doc))
            return json.loads(raw)

        def ok():
            got = fetch(p(), {"url": base + "/hello.txt"})
            expect(got, {"status": 200, "body": body})

        def not_found():
            got = fetch(p(), {"url": base + "/missing"})
            expect(got["status"], 404)
            return "body %d chars" % len(got["body"])

        def other_members():
            doc = ('{"method":"POST","nested":{"a":[1,"}",{"url":"no"}]},\n'
                   ' "n":-1.5e3, "url" : "%s/hello.txt", "after":true}' % base)
            expect(fetch(p(), doc)["status"], 200)

        def escaped_url():
            doc = '{"url":"%s\\/hello.txt"}' % base.replace("/", "\\/")
            expect(fetch(p(), doc), {"status": 200, "body": body})

        def bad_input():
            pl = p()
            msg = 'fetch: expected a JSON object with a string member "url"'
            for doc in ["", "nope", "[]", '{"url":5}', '{"href":"x"}', '{"url":"unterminated}']:
                expect(call_error(pl, "fetch", doc), msg)

        def refused(pl, url):
            # The SDK's error text is only the top of the error chain (a wasm
            # backtrace); the cause naming the URL is in the runtime's log.
            drain_logs()
            msg = call_error(pl, "fetch", json.dumps({"url": url}))
            cause = "HTTP request to %s is not allowed" % url
            if not any(cause in l for l in drain_logs()):
                raise AssertionError("no log line with %r; error was %r" % (cause, msg))
            return "logged: " + cause

        def denied_host():
            return refused(p(), "http://localhost:%d/hello.txt" % port)

        def no_allowed_hosts():
            return refused(p(hosts=None), base + "/hello.txt")

        for name, fn in [("fetch 200 + JSON-escaped body", ok),
                         ("fetch 404 status", not_found),
                         ("fetch url after other members", other_members),
                         ("fetch url with JSON escapes", escaped_url),
                         ("fetch bad input -> guest error", bad_input),
                         ("fetch host not allowed -> call fails", denied_host),
                         ("fetch with no allowed_hosts -> call fails", no_allowed_hosts)]:
            check("c_guest: " + name, fn)
    finally:
        server.terminate()
        server.wait(timeout=10)


def read_file_child(data_dir, path):
    """Child process: read_file with WASI stdout inherited; prints the guest's
    stdout line followed by a marker and the output."""
    os.environ["EXTISM_ENABLE_WASI_OUTPUT"] = "1"
    pl = load("zig_guest", wasi=True, allowed_paths={data_dir: "/data"})
    out = pl.call("read_file", path)
    sys.stdout.flush()
    os.write(1, b"\n--output--\n" + out)


def zig_read_file_checks(tmp):
    data = tmp / "data"
    (data / "sub").mkdir(parents=True)
    hello = b"hello from the host\n"
    big = bytes((i * 7) % 256 for i in range(10000))  # > 2 x the 4 KiB first buffer
    (data / "hello.txt").write_bytes(hello)
    (data / "sub" / "big.bin").write_bytes(big)
    (data / "empty.txt").write_bytes(b"")

    def p(paths=True):
        return load("zig_guest", wasi=True,
                    allowed_paths={str(data): "/data"} if paths else None)

    def read_hello():
        expect(p().call("read_file", "/data/hello.txt"), hello)

    def read_big_nested():
        expect(p().call("read_file", "/data/sub/big.bin"), big)

    def read_empty():
        expect(p().call("read_file", "/data/empty.txt"), b"")

    def stdout_line():
        r = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()),
                            CHILD_FLAG, str(data), "/data/hello.txt"],
                           capture_output=True, timeout=120)
        if r.returncode != 0:
            raise AssertionError("child failed: %r" % r.stderr[-2000:])
        expect(r.stdout, b"zig_guest: read_file /data/hello.txt\n\n--output--\n" + hello)

    def missing():
        expect(call_error(p(), "read_file", "/data/missing.txt"),
               "read_file: cannot open /data/missing.txt: errno 44")

    def outside():
        pl = p()
        expect(call_error(pl, "read_file", "/etc/passwd"),
               "read_file: no preopened directory for /etc/passwd")
        expect(call_error(pl, "read_file", "/database/x"),
               "read_file: no preopened directory for /database/x")

    def escape_attempt():
        msg = call_error(p(), "read_file", "/data/../../etc/passwd")
        if not msg.startswith("read_file: cannot open /data/../../etc/passwd: errno "):
            raise AssertionError(msg)
        return msg

    def directory():
        msg = call_error(p(), "read_file", "/data/sub")
        if not msg.startswith("read_file: cannot "):
            raise AssertionError(msg)
        return msg

    def empty_input():
        expect(call_error(p(), "read_file", ""), "read_file: expected a path")

    def no_preopens():
        expect(call_error(p(paths=False), "read_file", "/data/hello.txt"),
               "read_file: no preopened directory for /data/hello.txt")

    def needs_wasi():
        try:
            pl = load("zig_guest", wasi=False)
            pl.call("greet", "x")
        except extism.Error as e:
            return str(e).splitlines()[0][:100]
        raise AssertionError("loaded and ran without WASI")

    for name, fn in [("read_file /data/hello.txt", read_hello),
                     ("read_file nested 10000-byte binary file", read_big_nested),
                     ("read_file empty file", read_empty),
                     ("read_file writes its line to WASI stdout", stdout_line),
                     ("read_file missing file -> errno 44", missing),
                     ("read_file outside preopens -> guest error", outside),
                     ("read_file ../ escape -> open fails", escape_attempt),
                     ("read_file directory -> guest error", directory),
                     ("read_file empty input -> guest error", empty_input),
                     ("read_file without allowed_paths", no_preopens),
                     ("zig_guest without WASI fails to load", needs_wasi)]:
        check("zig_guest: " + name, fn)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == CHILD_FLAG:
        read_file_child(sys.argv[2], sys.argv[3])
        return 0
    print("extism runtime %s (python SDK %s)" % (extism.extism_version(), EXTISM_PY_VERSION))
    for name in ("c_guest", "zig_guest"):
        path = WASM / (name + ".wasm")
        print("%s: %d bytes" % (path.relative_to(HERE.parent), path.stat().st_size))
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        common_checks("c_guest", wasi=False)
        c_fetch_checks(tmp)
        common_checks("zig_guest", wasi=True)
        zig_read_file_checks(tmp)
    print("%d passed, %d failed" % (len(PASSED), len(FAILED)))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
