#!/usr/bin/env bash
# One command from a fresh Debian 12 machine (as root) to a micro-VM: installs
# the packages runvm needs, builds the guest kernel, the static agent, the Rust
# workspace and (where /dev/kvm cannot boot Linux) the QEMU TCG test host, then
# runs the main job. `--no-run` stops after the setup.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

run_job=1
case "${1:-}" in
    "") ;;
    --no-run) run_job=0 ;;
    -h|--help) echo "usage: $0 [--no-run]"; exit 0 ;;
    *) echo "setup.sh: error: unknown option '$1' (usage: $0 [--no-run])" >&2; exit 1 ;;
esac

log() { echo "==> $*" >&2; }
die() { echo "setup.sh: error: $*" >&2; exit 1; }

command -v cargo >/dev/null ||
    die "cargo is not installed; runvm needs a Rust toolchain >= 1.85 (rustup, https://rustup.rs)"

# containerd, podman (with conmon), docker.io and runc: the engines the runtime
# tests drive runvm from, and the runtime its benchmark compares with;
# docker-registry: the registry the pull tests start on 127.0.0.1.
packages=(build-essential bc flex bison libelf-dev libssl-dev xz-utils zstd kmod cpio
    busybox-static qemu-system-x86 linux-source-6.12 iproute2
    containerd podman conmon docker.io runc docker-registry)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or apt-get install them)"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

log "guest kernel (kernel-config/build.sh; cached after the first build, ~9 min on 2 cores)"
RUNVM_GUEST_KERNEL_DIR=$(kernel-config/build.sh)
export RUNVM_GUEST_KERNEL_DIR
log "guest agent, static (guest-agent/build-static.sh)"
RUNVM_AGENT_BIN=$(guest-agent/build-static.sh)
export RUNVM_AGENT_BIN
log "workspace (cargo build)"
cargo build --quiet --workspace --all-targets
if [ "$(id -u)" = 0 ]; then
    # Where runvm looks for its guest when no RUNVM_KERNEL/RUNVM_AGENT is set,
    # so container engines can call it unchanged.
    log "installing runvm to /usr/local/bin, its guest kernel and agent to /usr/local/share/runvm"
    install -D -m 0755 "${CARGO_TARGET_DIR:-target}/debug/runvm" /usr/local/bin/runvm
    install -D -m 0644 "$RUNVM_GUEST_KERNEL_DIR/vmlinux" /usr/local/share/runvm/vmlinux
    install -D -m 0755 "$RUNVM_AGENT_BIN" /usr/local/share/runvm/runvm-agent
    # The embedded default image, built offline from Debian's busybox-static,
    # so `runvm run busybox ...` needs no registry.
    if ! /usr/local/bin/runvm image inspect busybox >/dev/null 2>&1; then
        log "image busybox (Debian's busybox-static) into the store /var/lib/runvm"
        src=$(mktemp -d)
        trap 'rm -rf "$src"' EXIT
        mkdir -p "$src"/{bin,etc,tmp,root,proc,sys,dev}
        chmod 1777 "$src/tmp"
        cp /bin/busybox "$src/bin/busybox"
        for a in $(/bin/busybox --list); do
            [ "$a" = busybox ] || ln -s busybox "$src/bin/$a"
        done
        printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$src/etc/passwd"
        printf 'root:x:0:\nnogroup:x:65534:\n' > "$src/etc/group"
        /usr/local/bin/runvm image create busybox "$src" --cmd sh -e PATH=/bin >/dev/null
        rm -rf "$src"
        trap - EXIT
    fi
fi
# Guest RAM is a memfd that runvm advises for transparent huge pages; shmem
# honours that advice only in `advise` mode (Debian's default is `never`).
# Only where guests run on this host's KVM (the test host sets its own).
# Not persistent across reboots; the README says how to make it so.
kvm_mode=$(tests/testhost/testhost.sh mode)
thp=/sys/kernel/mm/transparent_hugepage
if [ "$(id -u)" = 0 ] && [ "$kvm_mode" = native ] &&
    grep -q '\[never\]' "$thp/shmem_enabled" 2>/dev/null; then
    log "shmem transparent huge pages: never -> advise (runvm advises guest RAM for them)"
    echo advise >"$thp/shmem_enabled" || log "could not set $thp/shmem_enabled"
    grep -q '\[defer\]' "$thp/defrag" || echo defer >"$thp/defrag" || true
fi
if [ "$kvm_mode" = testhost ]; then
    log "KVM test host (no VT-x/AMD-V here: KVM runs nested under QEMU TCG)"
    tests/testhost/testhost.sh setup
fi

[ "$run_job" = 1 ] || exit 0
log "main job: runvm runs a busybox container in a KVM micro-VM (runvm spec + runvm run; runvm image create + runvm run --rm busybox)"
# The tests route themselves into the test host when this machine needs one.
out=$(cargo test --quiet -p runvm-tests --test smoke -- --nocapture 2>&1) ||
    { echo "$out" >&2; die "the micro-VM did not boot or the container did not run (output above)"; }
echo "$out" | grep -m1 -o 'runvm-vmm spawn to agent ready.*'
echo "$out" | grep -m1 -o 'runvm run (boot, run, shutdown).*'
echo "$out" | grep -m1 -o 'runvm run --rm busybox (unpack.*'
