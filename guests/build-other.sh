#!/usr/bin/env bash
# Builds the Extism guest fixtures written in languages other than Rust and
# copies them to guests/wasm/ (committed, like the Rust fixtures' modules):
#   guests/c/c_guest.c      -> guests/wasm/c_guest.wasm   (wasm32-freestanding)
#   guests/zig/zig_guest.zig -> guests/wasm/zig_guest.wasm (wasm32-wasi reactor)
# Both are compiled by the Zig toolchain (`zig cc` for C), taken from the PyPI
# package `ziglang` at a pinned version and installed, if missing, into a
# cache directory outside the repository:
#   ${DEADLIFT_TOOLCHAINS:-$HOME/.cache/deadlift-toolchains}/ziglang-<version>
# Needs python3 with pip and access to PyPI on the first run only.
# Runnable from any directory; takes no arguments.
set -euo pipefail

ZIG_VERSION=0.15.2

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out_dir="$here/wasm"
cache="${DEADLIFT_TOOLCHAINS:-${XDG_CACHE_HOME:-$HOME/.cache}/deadlift-toolchains}"
zig_dir="$cache/ziglang-$ZIG_VERSION"
zig="$zig_dir/ziglang/zig"

if [ ! -x "$zig" ] || [ "$("$zig" version 2>/dev/null)" != "$ZIG_VERSION" ]; then
    echo "build-other.sh: installing ziglang==$ZIG_VERSION into $zig_dir" >&2
    rm -rf "$zig_dir"
    mkdir -p "$cache"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$zig_dir" "ziglang==$ZIG_VERSION"
fi
echo "zig $("$zig" version)"

# Build in a scratch directory so that nothing (objects, caches) lands in the
# repository; Zig's caches go to the toolchain cache.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export ZIG_GLOBAL_CACHE_DIR="$cache/zig-global-cache"
export ZIG_LOCAL_CACHE_DIR="$work/zig-local-cache"

# C: no libc, no entry point; exports come from export_name attributes.
# 64 KiB of stack (the default is 1 MiB) keeps the initial memory small.
(
    cd "$work"
    "$zig" cc --target=wasm32-freestanding -std=c11 -Os \
        -Wall -Wextra -Werror -nostdlib \
        -Wl,--no-entry -Wl,--strip-all -Wl,-z,stack-size=65536 \
        -o "$work/c_guest.wasm" "$here/c/c_guest.c"
)

# Zig: a reactor-style WASI module without _start; -rdynamic exports every
# `export fn`.
(
    cd "$work"
    "$zig" build-exe "$here/zig/zig_guest.zig" \
        -target wasm32-wasi -mexec-model=reactor -fno-entry -rdynamic \
        -O ReleaseSmall -fstrip --stack 65536 \
        -femit-bin="$work/zig_guest.wasm"
)

mkdir -p "$out_dir"
for name in c_guest zig_guest; do
    cp "$work/$name.wasm" "$out_dir/$name.wasm"
    printf '%-20s %8d bytes\n' "$name.wasm" "$(wc -c < "$out_dir/$name.wasm")"
done
