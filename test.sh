#!/usr/bin/env bash
# The test suite: formatting, lints, docs, unit tests and the integration
# tests, KVM ones included (run in the QEMU TCG test host where this machine's
# /dev/kvm cannot boot Linux; they never skip). Installs what it needs first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
[ $# -eq 0 ] || { echo "test.sh: error: takes no arguments (got '$*')" >&2; exit 1; }

./setup.sh --no-run
RUNVM_GUEST_KERNEL_DIR=$(kernel-config/build.sh 2>/dev/null)
RUNVM_AGENT_BIN=$(guest-agent/build-static.sh)
export RUNVM_GUEST_KERNEL_DIR RUNVM_AGENT_BIN

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "==> cargo doc" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --workspace --no-deps
mode=$(tests/testhost/testhost.sh mode)
echo "==> cargo test (KVM tests run in: $mode)" >&2
if [ "$mode" = testhost ]; then
    # Each KVM test boots its own 2-vCPU QEMU TCG test host; two at once on a
    # small machine starve the nested guests (heavy vsock tests then stalled or
    # triple-faulted in CI), so tests run one at a time there.
    export RUST_TEST_THREADS=1
fi
cargo test --workspace --no-fail-fast
