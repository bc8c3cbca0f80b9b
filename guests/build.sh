#!/usr/bin/env bash
# Builds every Extism guest fixture in this workspace for wasm32-unknown-unknown
# (release) and copies the modules to guests/wasm/<name>.wasm, which are
# committed so that the project's tests never need the wasm target.
# Runnable from any directory. Extra arguments are passed to `cargo build`
# (e.g. `./build.sh --locked`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target=wasm32-unknown-unknown
target_dir="$here/target"
out_dir="$here/wasm"

if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

# Keep the parent's or the caller's build settings out of this build.
unset CARGO_BUILD_TARGET CARGO_TARGET_DIR RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

cargo build \
    --manifest-path "$here/Cargo.toml" \
    --workspace \
    --release \
    --target "$target" \
    --target-dir "$target_dir" \
    "$@"

# Member crate names, read from the workspace manifest's `members = [...]`.
mapfile -t names < <(
    sed -n '/^members *= *\[/,/\]/p' "$here/Cargo.toml" | grep -o '"[^"]*"' | tr -d '"'
)
if [ "${#names[@]}" -eq 0 ]; then
    echo "build.sh: no workspace members found in $here/Cargo.toml" >&2
    exit 1
fi

mkdir -p "$out_dir"
for name in "${names[@]}"; do
    artifact="$target_dir/$target/release/${name//-/_}.wasm"
    if [ ! -f "$artifact" ]; then
        echo "build.sh: missing build output $artifact" >&2
        exit 1
    fi
    cp "$artifact" "$out_dir/$name.wasm"
    printf '%-20s %8d bytes\n' "$name.wasm" "$(wc -c < "$out_dir/$name.wasm")"
done

# Fail if any module imports something other than Extism kernel/user functions
# (e.g. WASI). Skipped when python3 is not installed.
if command -v python3 >/dev/null 2>&1; then
    if ! python3 "$here/check_wasm.py" >/dev/null; then
        python3 "$here/check_wasm.py" >&2 || true
        exit 1
    fi
fi
