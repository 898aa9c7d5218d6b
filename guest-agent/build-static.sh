#!/usr/bin/env bash
# Builds a guest binary (default runvm-agent; the tests also build
# runvm-guest-tool) as a static glibc executable, since the guest has no
# libc, and prints its path. Host binaries stay dynamic.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
package=${1:-runvm-agent}
case "$package" in
    runvm-agent | runvm-guest-tool) ;;
    *)
        echo "guest-agent/build-static.sh: error: unknown guest package '$package'" >&2
        exit 2
        ;;
esac
target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$root/target}/guest"
# --target keeps RUSTFLAGS away from build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --profile guest \
    --manifest-path "$root/Cargo.toml" -p "$package" --target "$target" --target-dir "$target_dir" >&2
bin="$target_dir/$target/guest/$package"
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
    echo "guest-agent/build-static.sh: error: $bin is dynamically linked" >&2
    exit 1
fi
# Cargo.toml's guest profile strips it: every guest unpacks it and keeps it in memory.
if [ "$package" = runvm-agent ] && readelf -S "$bin" | grep -q '\.symtab'; then
    echo "guest-agent/build-static.sh: error: $bin still has its symbol table" >&2
    exit 1
fi
echo "$bin"
