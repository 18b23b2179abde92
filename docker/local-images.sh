#!/usr/bin/env bash
# The base images the Dockerfile's ARGs name, made here from Debian packages (mmdebstrap, then
# `docker import`) where no image registry is reachable. Each is built only when its tag is
# missing; `docker rmi` one to rebuild it.
#
#   LOCAL_PYTHON_IMAGE   the runtime base: Debian's python3 (+ ca-certificates, passwd)
#   LOCAL_BUILDER_IMAGE  the same plus python3-venv, gcc and libc6-dev
#   LOCAL_RUST_IMAGE     only /usr/local/cargo: this host's Rust toolchain (cargo, rustc, std)
#   LOCAL_REDIS_IMAGE    Debian's redis-server, running as redis in /data (for compose)
#
# Needs root (mmdebstrap's root mode), mmdebstrap, a running Docker daemon and rustc/cargo.
. "$(dirname "$0")/lib.sh"
need_docker

# A Debian root file system as a tar stream on stdout; docs, man pages and translations left out.
# mmdebstrap's chatter goes to a log, shown only when it fails.
rootfs() { # extra mmdebstrap arguments...
    local mlog
    mlog=$(mktemp)
    if ! mmdebstrap --variant=essential --quiet \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$@" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        "$DEBIAN_SUITE" - \
        "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" \
        "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main" \
        "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main" 2>"$mlog"; then
        tail -40 "$mlog" >&2
        rm -f "$mlog"
        return 1
    fi
    rm -f "$mlog"
}

debian_image() { # tag, packages (comma-separated), extra mmdebstrap arguments...
    local tag=$1 packages=$2
    shift 2
    if have_image "$tag"; then
        log "have $tag"
        return
    fi
    wait_quiet
    log "building $tag from Debian $DEBIAN_SUITE: $packages"
    rootfs --include="$packages" "$@" |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
}

debian_image "$LOCAL_PYTHON_IMAGE" python3,ca-certificates,passwd
debian_image "$LOCAL_BUILDER_IMAGE" python3,python3-venv,ca-certificates,passwd,gcc,libc6-dev

if have_image "$LOCAL_REDIS_IMAGE"; then
    log "have $LOCAL_REDIS_IMAGE"
else
    # The package makes the redis user; /data is where the official image keeps its files too.
    wait_quiet
    log "building $LOCAL_REDIS_IMAGE from Debian $DEBIAN_SUITE: redis-server"
    rootfs --include=redis-server --customize-hook='chroot "$1" install -d -o redis -g redis -m 0750 /data' |
        docker import --change 'USER redis' --change 'WORKDIR /data' --change 'EXPOSE 6379' \
            --change 'CMD ["redis-server"]' - "$LOCAL_REDIS_IMAGE" >/dev/null
fi

if have_image "$LOCAL_RUST_IMAGE"; then
    log "have $LOCAL_RUST_IMAGE"
else
    # The official rust image keeps rustup's proxies in /usr/local/cargo/bin and the toolchain in
    # /usr/local/rustup; here the toolchain's own cargo and rustc sit in /usr/local/cargo/bin,
    # which finds its standard library (and rust-lld) in ../lib. /usr/local/rustup stays empty.
    sysroot=$(rustc --print sysroot)
    host=$(rustc -vV | sed -n 's/^host: //p')
    wait_quiet
    log "building $LOCAL_RUST_IMAGE from $sysroot"
    empty=$(mktemp -d)
    trap 'rm -rf "$empty"' EXIT
    mkdir -p "$empty/usr/local/rustup"
    # One stream: the empty rustup folder, then the toolchain's files under usr/local/cargo/.
    (cd "$sysroot" && tar -cf - -C "$empty" usr -C "$sysroot" \
        --transform 's,^\(bin\|lib\)/,usr/local/cargo/\1/,S' \
        bin/cargo bin/rustc lib/librustc_driver-*.so lib/libLLVM* "lib/rustlib/$host") |
        docker import --change 'ENV PATH=/usr/local/cargo/bin:/usr/bin:/bin' - "$LOCAL_RUST_IMAGE" >/dev/null
fi
