#!/usr/bin/env bash
# Starts a Docker daemon in the background for `make image` / `make test-container` on a machine
# that has Debian's docker.io but runs no service manager (CI, these development machines).
# Containers get no bridge network and the daemon touches no iptables: the tests use host
# networking only. overlay2 where the kernel and file system allow it, else vfs (slow, but works
# anywhere). Does nothing when a daemon already answers. Needs root.
set -euo pipefail
log() { printf 'start-dockerd: %s\n' "$*" >&2; }

if docker info >/dev/null 2>&1; then
    log "a Docker daemon already answers"
    exit 0
fi
command -v dockerd >/dev/null || { log "no dockerd: apt-get install docker.io"; exit 1; }

logfile=${DOCKERD_LOG:-/var/log/pwachat-dockerd.log}
start() { # extra dockerd arguments...
    nohup dockerd --bridge=none --iptables=false --ip6tables=false "$@" >>"$logfile" 2>&1 &
    local pid=$! deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        if docker info >/dev/null 2>&1; then
            log "dockerd $pid answers ($(docker info -f '{{.Driver}}') storage); log: $logfile"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
}

start || {
    log "dockerd did not start with the default storage driver; trying vfs (see $logfile)"
    start --storage-driver=vfs
} || { log "dockerd did not start; see $logfile"; tail -20 "$logfile" >&2; exit 1; }
