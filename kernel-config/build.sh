#!/usr/bin/env bash
# Builds runvm's guest kernel: the source with the patches in patches/
# applied, tinyconfig + the fragments in fragments/, checked after the merge,
# giving a PVH-bootable vmlinux and a bzImage.
#
# The result is cached outside the checkout under a key of (kernel source,
# patches, fragments, this script), so an unchanged configuration never
# rebuilds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../scripts/apt-install.sh
. "$here/../scripts/apt-install.sh"
fragments_dir="$here/fragments"
patches_dir="$here/patches"
default_source=/usr/src/linux-source-6.12.tar.xz
source_path=""
cache_dir="${RUNVM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runvm}/kernel"
jobs=$(nproc)
print_key=0

usage() {
    cat <<EOF
usage: $(basename "$0") [--source TARBALL|DIR] [--cache-dir DIR] [--jobs N] [--print-key]

Builds the runvm guest kernel and prints, alone on stdout, the directory holding
vmlinux, bzImage, the final config and build-info. Progress goes to stderr.

  --source PATH     kernel source tarball (.tar.xz) or unpacked tree
                    (default: $default_source, installed from Debian's
                    linux-source-6.12 package when missing)
  --cache-dir DIR   where built kernels are kept (default: $cache_dir)
  --jobs N          parallel make jobs (default: $jobs)
  --print-key       print the cache key of this source and these fragments
                    and stop (nothing is built)
EOF
}

die() { echo "kernel-config/build.sh: error: $*" >&2; exit 1; }
log() { echo "kernel-config/build.sh: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --source) [ $# -ge 2 ] || die "--source needs a path"; source_path=$2; shift 2 ;;
        --cache-dir) [ $# -ge 2 ] || die "--cache-dir needs a path"; cache_dir=$2; shift 2 ;;
        --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; jobs=$2; shift 2 ;;
        --print-key) print_key=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive number, got '$jobs'"


if [ -z "$source_path" ]; then
    source_path=$default_source
    [ -e "$source_path" ] || apt_install linux-source-6.12
fi
[ -e "$source_path" ] || die "kernel source '$source_path' does not exist"

missing=()
for tool in make gcc bc flex bison xz patch; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ -e /usr/include/libelf.h ] || missing+=(libelf-dev)
[ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
if [ ${#missing[@]} -gt 0 ]; then
    pkgs=()
    for m in "${missing[@]}"; do case "$m" in xz) pkgs+=(xz-utils) ;; gcc) pkgs+=(gcc libc6-dev) ;; *) pkgs+=("$m") ;; esac; done
    apt_install "${pkgs[@]}"
fi

# Bump when a change to the build steps below changes the output; edits that
# do not (comments, messages) must not force a 9-minute rebuild.
recipe=2

# The key covers every input that changes the output.
if [ -d "$source_path" ]; then
    [ -f "$source_path/Makefile" ] || die "'$source_path' is not a kernel source tree (no Makefile)"
    src_id=$(make -s -C "$source_path" kernelversion 2>/dev/null) || die "cannot read the kernel version of '$source_path'"
    src_id="dir:$(cd "$source_path" && pwd):$src_id"
else
    case "$source_path" in *.tar.xz|*.tar.gz|*.tar) ;; *) die "'$source_path' is neither a directory nor a .tar.xz/.tar.gz/.tar archive" ;; esac
    src_id="tar:$(sha256sum "$source_path" | cut -d' ' -f1)"
fi
shopt -s nullglob
fragments=("$fragments_dir"/*.conf)
[ ${#fragments[@]} -gt 0 ] || die "no fragments in $fragments_dir"
patches=("$patches_dir"/*.patch)
# Only what merge_config.sh reads counts (the option lines, in fragment
# order): a fragment's comments explain a choice and never force a rebuild.
key=$( {
    echo "recipe $recipe"
    echo "$src_id"
    for p in "${patches[@]}"; do
        echo "== $(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"
    done
    for f in "${fragments[@]}"; do
        echo "== $(basename "$f")"
        grep -E '^(CONFIG_|# CONFIG_[A-Za-z0-9_]+ is not set$)' "$f" || true
    done
} | sha256sum | cut -c1-16)
if [ "$print_key" = 1 ]; then
    echo "$key"
    exit 0
fi
out="$cache_dir/$key"

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ] && [ -f "$out/config" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

mkdir -p "$cache_dir"
work=$(mktemp -d "$cache_dir/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

if [ -d "$source_path" ] && [ ${#patches[@]} -gt 0 ]; then
    # Patches never touch the caller's tree: they go into a copy.
    log "copying $source_path to patch it"
    cp -a "$source_path" "$work/src"
    tree=$work/src
    build_args=()
    objdir=$tree
elif [ -d "$source_path" ]; then
    tree=$source_path
    build_args=(O="$work/obj")
    mkdir -p "$work/obj"
    objdir="$work/obj"
else
    log "unpacking $source_path"
    tar -xf "$source_path" -C "$work"
    tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
    [ -n "$tree" ] && [ -f "$tree/Makefile" ] || die "'$source_path' holds no kernel source tree"
    build_args=()
    objdir=$tree
fi

run_make() { make -C "$tree" "${build_args[@]}" "$@" >>"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "make $* failed (log above)"; }; }

# A patch that does not apply cleanly (another kernel version) stops the
# build: a kernel without it would still boot, and silently lose what the
# patch is for.
for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -p1 -N --batch --fuzz=0 --quiet -d "$tree" <"$p" >>"$work/build.log" 2>&1 ||
        { tail -n 20 "$work/build.log" >&2; die "patch $(basename "$p") does not apply to $(basename "$tree")"; }
done

log "configuring ($(basename "$tree"), key $key)"
run_make tinyconfig
(cd "$objdir" && KCONFIG_CONFIG=.config "$tree/scripts/kconfig/merge_config.sh" -m -O "$objdir" .config "${fragments[@]}" >>"$work/build.log" 2>&1) ||
    die "merge_config.sh failed (see $work/build.log)"
run_make olddefconfig

# merge_config.sh silently drops options whose dependencies are missing, so
# every line a fragment asks for is checked against the final .config.
bad=0
for f in "${fragments[@]}"; do
    while IFS= read -r line; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            grep -qxF "$line" "$objdir/.config" || {
                got=$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$objdir/.config" || echo "absent")
                echo "  $(basename "$f"): wanted $line, got: $got" >&2; bad=1; }
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            if grep -qE "^${BASH_REMATCH[1]}=" "$objdir/.config"; then
                echo "  $(basename "$f"): wanted ${BASH_REMATCH[1]} unset, got: $(grep -E "^${BASH_REMATCH[1]}=" "$objdir/.config")" >&2; bad=1
            fi
        fi
    done <"$f"
done
[ "$bad" = 0 ] || die "the final .config lacks options the fragments ask for (listed above)"

log "building vmlinux and bzImage with $jobs jobs (log: $work/build.log)"
run_make -j"$jobs" vmlinux bzImage

mkdir -p "$work/out"
cp "$objdir/vmlinux" "$work/out/vmlinux"
cp "$objdir/arch/x86/boot/bzImage" "$work/out/bzImage"
cp "$objdir/.config" "$work/out/config"
end=$(date +%s)
{
    echo "key=$key"
    echo "source=$src_id"
    echo "build_seconds=$((end - start))"
    echo "jobs=$jobs"
    echo "vmlinux_bytes=$(stat -c %s "$work/out/vmlinux")"
    echo "bzimage_bytes=$(stat -c %s "$work/out/bzImage")"
} >"$work/out/build-info"
rm -rf "$out"
mv "$work/out" "$out"
log "built in $((end - start)) s: $out"
sed 's/^/  /' "$out/build-info" >&2
echo "$out"
