#!/usr/bin/env bash
# Builds runvm-agent as a static glibc binary (the guest has no libc) and
# prints its path. Only the agent is static: the host binaries stay dynamic.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$root/target}/guest"
# --target keeps RUSTFLAGS away from build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
    --manifest-path "$root/Cargo.toml" -p runvm-agent --target "$target" --target-dir "$target_dir" >&2
bin="$target_dir/$target/release/runvm-agent"
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
    echo "guest-agent/build-static.sh: error: $bin is dynamically linked" >&2
    exit 1
fi
echo "$bin"
