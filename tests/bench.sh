#!/usr/bin/env bash
# Runs a benchmark that prints figures: tests/bench.sh boot|devices|runtime|unpack
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
    boot | devices | runtime) ;;
    # Host-only: no guest, no KVM.
    unpack) exec cargo bench --quiet -p runvm-images --bench unpack ;;
    *) echo "usage: $0 boot|devices|runtime|unpack" >&2; exit 2 ;;
esac
RUNVM_GUEST_KERNEL_DIR=$(kernel-config/build.sh)
RUNVM_AGENT_BIN=$(guest-agent/build-static.sh)
RUNVM_GUEST_TOOL_BIN=$(guest-agent/build-static.sh runvm-guest-tool)
export RUNVM_GUEST_KERNEL_DIR RUNVM_AGENT_BIN RUNVM_GUEST_TOOL_BIN
cargo build --quiet --release -p runvm-vmm -p runvm
cargo bench --quiet -p runvm-tests --bench "$1"
