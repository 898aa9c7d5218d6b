#!/usr/bin/env bash
# The KVM test host: runs a command where KVM can boot a standard Linux guest.
#
# On a machine with real VT-x/AMD-V the command runs directly. Elsewhere (no
# /dev/kvm, or a PVM /dev/kvm that only boots PVM-patched kernels) it runs
# inside a throwaway QEMU TCG VM with emulated AMD SVM, where kvm-amd works:
# this machine's / is shared read-only over 9p and chrooted into, so the
# checkout, cargo's target dir and Debian's binaries are all visible at the
# same paths. /tmp, /run and /var/tmp are fresh tmpfs; a per-run scratch
# directory (given to the command as $RUNVM_SCRATCH) is shared read-write.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../scripts/apt-install.sh
. "$here/../../scripts/apt-install.sh"
cache_root="${RUNVM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runvm}/testhost"
# Loaded in this order after their dependencies (resolved from modules.dep).
qemu=${RUNVM_QEMU:-qemu-system-x86_64}
modules=(virtio_pci 9p 9pnet_virtio kvm_amd tun vhost_net vhost_vsock vsock_loopback overlay fuse veth sch_ingress cls_u32 act_mirred bridge)

die() { echo "testhost: error: $*" >&2; exit 1; }
log() { echo "testhost: $*" >&2; }

usage() {
    cat <<EOF
usage: $(basename "$0") COMMAND

  mode                      print how KVM tests run here: 'native' or 'testhost'
  setup                     install QEMU and build the test host (kernel + initramfs)
  run [OPTIONS] [--] CMD..  run CMD where KVM works; exits with CMD's status
      --timeout SECONDS     kill the test host after this long (default 1800)
      --mem MIB             test host memory (default 6144)
      --smp N               test host CPUs (default: this machine's, at most 2)
                            (a test host whose own kernel locks up, panics or
                            stops its heartbeat is stopped and the command
                            run once more in a fresh one)

Environment: RUNVM_TESTHOST=auto|always|never (default auto) forces or forbids
the test host; RUNVM_CACHE_DIR moves the cache (default ~/.cache/runvm);
RUNVM_QEMU names the QEMU binary (default qemu-system-x86_64).
Variables named RUNVM_*, RUST_*, CARGO_* and NEXTEST_* reach the command.
EOF
}

# Real hardware virtualization, not PVM: only then can /dev/kvm boot Linux.
native_kvm() {
    [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    [ -d /sys/module/kvm_pvm ] && return 1
    grep -qwE 'vmx|svm' /proc/cpuinfo
}

mode() {
    case "${RUNVM_TESTHOST:-auto}" in
        always) echo testhost ;;
        never) echo native ;;
        auto) if native_kvm; then echo native; else echo testhost; fi ;;
        *) die "RUNVM_TESTHOST must be auto, always or never, not '${RUNVM_TESTHOST}'" ;;
    esac
}


host_kernel_package() {
    local dep
    dep=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9.]*-[0-9]*-amd64\)$/\1/p' | head -n1)
    if [ -z "$dep" ]; then
        apt-get update -qq >&2 || true
        dep=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9.]*-[0-9]*-amd64\)$/\1/p' | head -n1)
    fi
    [ -n "$dep" ] || die "cannot find Debian's linux-image-amd64 in apt (is this Debian 12 with apt sources?)"
    echo "$dep-unsigned"
}

# Prints the directory holding vmlinuz and initrd.gz, building it if needed.
setup() {
    local need=()
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    [ -x /bin/busybox ] && ! readelf -l /bin/busybox 2>/dev/null | grep -q interpreter || need+=(busybox-static)
    command -v cpio >/dev/null || need+=(cpio)
    command -v xz >/dev/null || need+=(xz-utils)
    command -v zstd >/dev/null || need+=(zstd)
    command -v depmod >/dev/null || need+=(kmod)
    command -v apt-cache >/dev/null || die "the test host is built from Debian packages and needs apt"
    [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

    local pkg debdir deb key dir
    pkg=$(host_kernel_package)
    debdir="$cache_root/debs"
    mkdir -p "$debdir"
    deb=$(find "$debdir" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n1)
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        (cd "$debdir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2) || die "apt-get download $pkg failed"
        deb=$(find "$debdir" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n1)
        [ -n "$deb" ] || die "apt-get download $pkg left no .deb in $debdir"
    fi
    key=$( { basename "$deb"; sha256sum /bin/busybox; cat "$0" "$here/init"; } | sha256sum | cut -c1-16)
    dir="$cache_root/$key"
    if [ -f "$dir/vmlinuz" ] && [ -f "$dir/initrd.gz" ]; then
        echo "$dir"
        return
    fi

    log "building the test host initramfs from $(basename "$deb")"
    local work
    work=$(mktemp -d "$cache_root/.build.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    dpkg-deb -x "$deb" "$work/pkg"
    local kver moddir
    kver=$(ls "$work/pkg/lib/modules" | head -n1)
    moddir="$work/pkg/lib/modules/$kver"
    # The package leaves modules.dep to depmod at install time.
    depmod -b "$work/pkg" "$kver" || die "depmod failed for $kver"
    [ -f "$moddir/modules.dep" ] || die "depmod wrote no modules.dep for $kver"

    # Depth-first over modules.dep so each module follows its dependencies.
    local -A seen=()
    local order=()
    visit() {
        local name=$1 line path deps d
        line=$(grep -E "(^|/)${name//_/[_-]}\.ko(\.xz|\.zst|\.gz)?:" "$moddir/modules.dep" | head -n1) ||
            die "module $name not found in $kver"
        path=${line%%:*}
        [ -n "${seen[$path]:-}" ] && return
        seen[$path]=1
        deps=${line#*:}
        for d in $deps; do
            d=$(basename "$d"); d=${d%%.ko*}
            visit "$d"
        done
        order+=("$path")
    }
    local m
    for m in "${modules[@]}"; do visit "$m"; done

    local root="$work/root"
    mkdir -p "$root"/{bin,dev,proc,sys,host,modules}
    cp /bin/busybox "$root/bin/busybox"
    local i=0 src dst
    : >"$root/modules/order"
    for m in "${order[@]}"; do
        src="$moddir/$m"
        dst=$(printf '%02d-%s' "$i" "$(basename "${m%%.ko*}").ko")
        case "$m" in
            *.xz) xz -dc "$src" >"$root/modules/$dst" ;;
            *.zst) zstd -qdc "$src" >"$root/modules/$dst" ;;
            *.gz) gzip -dc "$src" >"$root/modules/$dst" ;;
            *) cp "$src" "$root/modules/$dst" ;;
        esac
        echo "$dst" >>"$root/modules/order"
        i=$((i + 1))
    done
    cp "$here/init" "$root/init"
    chmod 755 "$root/init"
    mkdir -p "$work/out"
    (cd "$root" && find . | sort | cpio -o -H newc --quiet | gzip -1 >"$work/out/initrd.gz")
    cp "$work/pkg/boot/vmlinuz-$kver" "$work/out/vmlinuz"
    echo "$kver" >"$work/out/kernel-version"
    rm -rf "$dir"
    mv "$work/out" "$dir"
    rm -rf "$work"
    trap - EXIT
    log "test host ready: $dir (kernel $kver)"
    echo "$dir"
}

run_direct() {
    local timeout=$1; shift
    export RUNVM_SCRATCH
    RUNVM_SCRATCH=$(mktemp -d /tmp/runvm-scratch.XXXXXX)
    local rc=0
    timeout -k 10 "$timeout" "$@" || rc=$?
    rm -rf "$RUNVM_SCRATCH"
    [ "$rc" = 124 ] && log "timed out after $timeout s"
    return "$rc"
}

# The test host mounts fresh tmpfs on /tmp, /run and /var/tmp. Host paths the
# command needs there (its cwd, absolute arguments, RUNVM_*/CARGO_* paths) are
# listed, as their top directory below that mount, to be bound back in.
keep_paths() {
    local p var
    {
        printf '%s\n' "$PWD" "$@"
        for var in $(compgen -e | grep -E '^(RUNVM_|CARGO_)' || true); do
            printf '%s\n' "${!var}"
        done
    } | while IFS= read -r p; do
        case "$p" in
            /tmp/?*|/run/?*|/var/tmp/?*)
                p=$(realpath -m "$p")
                case "$p" in
                    /var/tmp/*) echo "/var/tmp/$(echo "${p#/var/tmp/}" | cut -d/ -f1)" ;;
                    /tmp/*|/run/*) echo "$p" | cut -d/ -f1-3 ;;
                esac ;;
        esac
    done | sort -u
}

# Prints, three times 1 s apart, each test host CPU's instruction pointer,
# halt flag and CR3 from QEMU's monitor (the pipe chardev $1/qmon), named as
# a test host kernel symbol where $1/kallsyms has it (RUNVM_TESTHOST_SYMBOLS=1
# has the test host save it; left out by default, as it costs each test host
# a second or two) or else as module+offset from $1/modules. A monitor that
# does not answer means QEMU itself is stuck, which is said too.
cpu_samples() {
    local scratch=$1 i out
    for i in 1 2 3; do
        timeout 3 sh -c 'printf "info registers -a\\n" >"$1"' sh "$scratch/qmon.in" || true
        out=$(timeout 3 cat "$scratch/qmon.out" | tr -d '\r' | grep -aE '^CPU#|^RIP=|^EIP=|^CR0=' || true)
        if [ -z "$out" ]; then
            echo "  sample $i: QEMU's monitor did not answer (QEMU itself is stuck)"
            return
        else
            echo "$out" | awk -v syms="$scratch/kallsyms" -v mods="$scratch/modules" -v n="$i" '
                function hex(h,   v, k, c) {
                    # The low 48 bits: exact in the doubles of awk, and every kernel
                    # address shares the high ones.
                    v = 0; h = tolower(h); sub(/^0x/, "", h)
                    if (length(h) > 12) h = substr(h, length(h) - 11)
                    for (k = 1; k <= length(h); k++) { c = index("0123456789abcdef", substr(h, k, 1)); v = v * 16 + c - 1 }
                    return v
                }
                function name(rip,   line, f, r, best, bname, base) {
                    r = hex(rip); best = -1; bname = ""
                    while ((getline line < syms) > 0) {
                        split(line, f, " ")
                        if (f[2] ~ /^[tT]$/) { base = hex(f[1]); if (base <= r && base > best) { best = base; bname = f[3] (f[4] == "" ? "" : " " f[4]) } }
                    }
                    close(syms)
                    if (bname != "") return sprintf("%s+0x%x", bname, r - best)
                    while ((getline line < mods) > 0) {
                        split(line, f, " "); base = hex(f[6])
                        if (base > 0 && r >= base && r < base + f[2]) bname = sprintf("%s+0x%x", f[1], r - base)
                    }
                    close(mods)
                    return bname
                }
                /^CPU#/ { cpu = $1 }
                /^RIP=|^EIP=/ { split($1, r, "="); rip = r[2]; hlt = $NF }
                /^CR0=/ { s = name(rip); printf "  sample %s %s RIP=%s %s %s%s\n", n, cpu, rip, hlt, $3, (s == "" ? "" : " (" s ")") }'
        fi
        sleep 1
    done
}

run_testhost() {
    local timeout=$1 mem=$2 smp=$3; shift 3
    command -v "$qemu" >/dev/null ||
        die "no KVM here that boots Linux (no vmx/svm, or PVM) and no QEMU for the test host ($qemu not found); run '$0 setup' as root"
    local dir
    dir=$(setup)

    scratch=$(mktemp -d /tmp/runvm-testhost.XXXXXX)
    qpid=""
    tails=()
    cleanup() {
        [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
        for t in "${tails[@]}"; do kill "$t" 2>/dev/null || true; done
        [ -n "${RUNVM_TESTHOST_KEEP:-}" ] && log "kept $scratch" || rm -rf "$scratch"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    {
        printf 'cd %q || exit 125\n' "$PWD"
        local var
        while IFS= read -r var; do
            printf 'export %s=%q\n' "$var" "${!var}"
        done < <(compgen -e | grep -E '^(RUNVM_|RUST_|CARGO_|NEXTEST_)' | grep -vx 'RUNVM_SCRATCH' || true)
        printf 'export PATH=%q HOME=%q RUNVM_IN_TESTHOST=1 RUNVM_SCRATCH=%q\n' "$PATH" "$HOME" "$scratch/work"
        printf 'exec'
        printf ' %q' "$@"
        printf '\n'
    } >"$scratch/cmd.sh"
    mkdir "$scratch/work"
    mkfifo "$scratch/qmon.in" "$scratch/qmon.out"
    keep_paths "$@" >"$scratch/keep"
    : >"$scratch/stdout"
    : >"$scratch/stderr"

    timeout -k 5 "$timeout" "$qemu" \
        -accel tcg -cpu max -smp "$smp" -m "$mem" -nodefaults -no-reboot \
        -display none -monitor "pipe:$scratch/qmon" -serial "file:$scratch/console.log" \
        -kernel "$dir/vmlinuz" -initrd "$dir/initrd.gz" \
        -append "console=ttyS0 rdinit=/init quiet loglevel=3 panic=-1 runvm_scratch=$scratch${RUNVM_TESTHOST_SYMBOLS:+ runvm_kallsyms=1}" \
        -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
        -virtfs "local,path=$scratch,mount_tag=scratch,security_model=none,multidevs=remap" \
        </dev/null &
    qpid=$!
    tail -f -n +1 --pid="$qpid" "$scratch/stdout" &
    tails+=($!)
    tail -f -n +1 --pid="$qpid" "$scratch/stderr" >&2 &
    tails+=($!)
    # The test host's own kernel sometimes hangs (nested KVM on TCG's SVM):
    # a CPU stuck in its KVM ("soft lockup ... [runvm-vmm]", for good), or
    # the whole machine silent. Waiting for the timeout wastes it; stop
    # early and let cmd_run retry.
    (
        while kill -0 "$qpid" 2>/dev/null; do
            why=
            if grep -qE 'soft lockup - CPU#[0-9]+ stuck for (1[2-9][0-9]|[2-9][0-9]{2}|[0-9]{4,})s' \
                "$scratch/console.log" 2>/dev/null; then
                why="a CPU stuck in its KVM for 2 minutes (soft lockup)"
            elif grep -q 'Kernel panic - not syncing' "$scratch/console.log" 2>/dev/null; then
                why="its kernel panicked"
            elif [ -f "$scratch/heartbeat" ] &&
                [ $(( $(date +%s) - $(stat -c %Y "$scratch/heartbeat") )) -gt 180 ]; then
                why="no heartbeat for 3 minutes"
            fi
            if [ -n "$why" ]; then
                cpu_samples "$scratch" >"$scratch/cpus" 2>&1 || true
                echo "$why" >"$scratch/lockup"
                kill "$qpid" 2>/dev/null
                break
            fi
            sleep 5
        done
    ) &
    tails+=($!)

    local qrc=0
    wait "$qpid" || qrc=$?
    qpid=""
    for t in "${tails[@]}"; do wait "$t" 2>/dev/null || true; done
    tails=()

    if [ -f "$scratch/lockup" ]; then
        log "the test host's kernel locked up ($(cat "$scratch/lockup")); console:"
        tail -n 16 "$scratch/console.log" >&2 2>/dev/null || true
        log "where its CPUs were (QEMU monitor, three samples 1 s apart):"
        cat "$scratch/cpus" >&2 2>/dev/null || true
        [ -n "${RUNVM_TESTHOST_KEEP:-}" ] || rm -rf "$scratch"
        testhost_locked_up=1
        return 125
    fi
    if [ -f "$scratch/rc" ]; then
        return "$(cat "$scratch/rc")"
    fi
    # The test host's console carries only its own kernel's messages (the
    # nested guests' go to files): a panic there is the emulated host's.
    if grep -q 'Kernel panic - not syncing' "$scratch/console.log" 2>/dev/null; then
        log "the test host's kernel locked up (its kernel panicked); console:"
        grep -B 12 -m1 'Kernel panic - not syncing' "$scratch/console.log" >&2 || true
        [ -n "${RUNVM_TESTHOST_KEEP:-}" ] || rm -rf "$scratch"
        testhost_locked_up=1
        return 125
    fi
    if [ "$qrc" = 124 ]; then
        log "timed out after $timeout s; last console lines:"
    else
        log "the test host ended without a result (qemu exit $qrc); last console lines:"
    fi
    tail -n 30 "$scratch/console.log" >&2 2>/dev/null || true
    return 125
}

cmd_run() {
    local timeout=1800 mem=6144 smp
    smp=$(nproc); [ "$smp" -gt 2 ] && smp=2
    while [ $# -gt 0 ]; do
        case "$1" in
            --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout=$2; shift 2 ;;
            --mem) [ $# -ge 2 ] || die "--mem needs MiB"; mem=$2; shift 2 ;;
            --smp) [ $# -ge 2 ] || die "--smp needs a count"; smp=$2; shift 2 ;;
            --) shift; break ;;
            -*) usage >&2; die "unknown option '$1'" ;;
            *) break ;;
        esac
    done
    [ $# -gt 0 ] || die "run needs a command"
    local n
    for n in "$timeout" "$mem" "$smp"; do
        [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive number"
    done
    local rc=0
    if [ "$(mode)" = native ]; then
        native_kvm || [ "${RUNVM_TESTHOST:-auto}" = never ] || die "no usable /dev/kvm"
        run_direct "$timeout" "$@" || rc=$?
    else
        testhost_locked_up=0
        run_testhost "$timeout" "$mem" "$smp" "$@" || rc=$?
        if [ "$testhost_locked_up" = 1 ]; then
            # A fault of the emulated host, not of the command: one more
            # run, said out loud; a second lockup fails.
            log "running the command once more in a fresh test host"
            rc=0
            run_testhost "$timeout" "$mem" "$smp" "$@" || rc=$?
        fi
    fi
    exit "$rc"
}

[ $# -gt 0 ] || { usage >&2; exit 2; }
case "$1" in
    mode) mode ;;
    setup) shift; [ $# -eq 0 ] || die "setup takes no arguments"; setup >/dev/null; log "ready ($(mode) mode here)" ;;
    run) shift; cmd_run "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; die "unknown command '$1'" ;;
esac
