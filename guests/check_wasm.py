#!/usr/bin/env python3
"""List the imports and exports of the built guest fixtures and check them.

Usage: python3 guests/check_wasm.py [FILE.wasm ...]   (default: guests/wasm/*.wasm)

For every module it prints each import (module, name, signature) and each
export (kind, name, and signature for functions). It exits non-zero if a
module imports from anything other than `extism:host/env` and
`extism:host/user` (for example `wasi_snapshot_preview1`, allowed only for the
fixtures in WASI_FIXTURES), or if it imports
something other than functions. Standard library only; parses just the type,
import, function and export sections of the wasm binary format.
"""

import pathlib
import sys

ALLOWED_MODULES = {"extism:host/env", "extism:host/user"}
# Fixtures that exist to exercise WASI may import it too.
WASI_FIXTURES = {"zig_guest.wasm"}
VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
            0x70: "funcref", 0x6F: "externref"}
KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}


class Reader:
    def __init__(self, data, pos=0, end=None):
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def byte(self):
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self):
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def name(self):
        n = self.uleb()
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def limits(self):
        flags = self.byte()
        self.uleb()
        if flags & 1:
            self.uleb()


def sig(t):
    params, results = t
    return "(%s) -> (%s)" % (", ".join(params), ", ".join(results))


def parse(data):
    if data[:4] != b"\0asm":
        raise ValueError("not a wasm module")
    r = Reader(data, 8)
    types, imports, exports, func_types = [], [], [], []
    while r.pos < len(data):
        sid = r.byte()
        size = r.uleb()
        s = Reader(data, r.pos, r.pos + size)
        r.pos += size
        if sid == 1:  # type
            for _ in range(s.uleb()):
                if s.byte() != 0x60:
                    raise ValueError("unsupported type form")
                params = [VALTYPES.get(s.byte(), "?") for _ in range(s.uleb())]
                results = [VALTYPES.get(s.byte(), "?") for _ in range(s.uleb())]
                types.append((params, results))
        elif sid == 2:  # import
            for _ in range(s.uleb()):
                module, name, kind = s.name(), s.name(), s.byte()
                desc = ""
                if kind == 0:
                    ti = s.uleb()
                    func_types.append(ti)
                    desc = sig(types[ti])
                elif kind == 1:
                    s.byte()
                    s.limits()
                elif kind == 2:
                    s.limits()
                elif kind == 3:
                    s.byte()
                    s.byte()
                else:
                    raise ValueError("unsupported import kind %d" % kind)
                imports.append((module, name, KINDS.get(kind, "?"), desc))
        elif sid == 3:  # function
            func_types.extend(s.uleb() for _ in range(s.uleb()))
        elif sid == 7:  # export
            for _ in range(s.uleb()):
                name, kind, index = s.name(), s.byte(), s.uleb()
                exports.append((name, KINDS.get(kind, "?"), index))
    out = []
    for name, kind, index in exports:
        desc = sig(types[func_types[index]]) if kind == "func" else ""
        out.append((name, kind, desc))
    return imports, out


def main(argv):
    here = pathlib.Path(__file__).resolve().parent
    files = [pathlib.Path(a) for a in argv] or sorted((here / "wasm").glob("*.wasm"))
    if not files:
        print("no .wasm files found", file=sys.stderr)
        return 1
    bad = 0
    for path in files:
        imports, exports = parse(path.read_bytes())
        print("== %s (%d bytes)" % (path.name, path.stat().st_size))
        for module, name, kind, desc in imports:
            flag = ""
            allowed = ALLOWED_MODULES | (
                {"wasi_snapshot_preview1"} if path.name in WASI_FIXTURES else set())
            if module not in allowed or kind != "func":
                flag = "   <-- NOT ALLOWED"
                bad += 1
            print("  import %s %s::%s %s%s" % (kind, module, name, desc, flag))
        for name, kind, desc in exports:
            print("  export %s %s %s" % (kind, name, desc))
    if bad:
        print("%d disallowed import(s)" % bad, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
