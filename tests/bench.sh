#!/usr/bin/env bash
# Runs a benchmark that prints figures: tests/bench.sh boot
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
    boot) ;;
    *) echo "usage: $0 boot" >&2; exit 2 ;;
esac
RUNVM_GUEST_KERNEL_DIR=$(kernel-config/build.sh)
RUNVM_AGENT_BIN=$(guest-agent/build-static.sh)
export RUNVM_GUEST_KERNEL_DIR RUNVM_AGENT_BIN
cargo build --quiet --release -p runvm-vmm
cargo bench --quiet -p runvm-tests --bench "$1"
