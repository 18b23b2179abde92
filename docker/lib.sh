# Shared by the docker/*.sh scripts (sourced).
set -euo pipefail

: "${DEBIAN_SUITE:=bookworm}"
: "${DEBIAN_MIRROR:=http://deb.debian.org/debian}"
: "${DEBIAN_SECURITY_MIRROR:=http://deb.debian.org/debian-security}"
: "${LOCAL_PYTHON_IMAGE:=pwachat-local/python:$DEBIAN_SUITE}"
: "${LOCAL_BUILDER_IMAGE:=pwachat-local/python-build:$DEBIAN_SUITE}"
: "${LOCAL_REDIS_IMAGE:=pwachat-local/redis:$DEBIAN_SUITE}"
: "${LOCAL_RUST_IMAGE:=pwachat-local/rust:$(rustc --version | cut -d' ' -f2)}"
: "${IMAGE:=pwachat:latest}"
# The Makefile names them all; these defaults serve a script run by hand.

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }

# PWACHAT_QUIET_LOCK names a file whose presence means "someone needs a quiet machine" (a
# benchmark): CPU-heavy steps wait while it exists. Unset: no waiting.
wait_quiet() {
    [ -n "${PWACHAT_QUIET_LOCK:-}" ] || return 0
    while [ -e "$PWACHAT_QUIET_LOCK" ]; do
        log "waiting: $PWACHAT_QUIET_LOCK exists"
        sleep 10
    done
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

need_docker() {
    docker info >/dev/null 2>&1 || {
        log "no Docker daemon answers; start one (as root: docker/start-dockerd.sh)"
        exit 1
    }
}
