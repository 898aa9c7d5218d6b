# Sourced by the project's scripts: apt_install PKG... installs Debian
# packages quietly, running apt-get update once if the lists are stale.
# The caller defines die() and log().
apt_install() {
    [ "$(id -u)" = 0 ] || die "missing $*; install them as root: apt-get install $*"
    command -v apt-get >/dev/null || die "missing $* and no apt-get to install them"
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 ||
        { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2; } ||
        die "could not install $*"
}
