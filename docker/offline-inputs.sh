#!/usr/bin/env bash
# What an OFFLINE=1 build installs instead of asking an index, fetched here on the host:
#   docker/offline/wheels/  maturin and pwachat's runtime dependencies (pyproject.toml), as wheels
#                           for the Python of LOCAL_PYTHON_IMAGE
#   docker/offline/vendor/  the crates of Cargo.lock (cargo vendor)
# Each is fetched again only when what it depends on changed.
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
out=docker/offline
python=${PYTHON:-python3}

need_docker
# The wheels must fit the image's interpreter, not this host's: its tags and its environment
# markers (see pip-download-for.py), read from the image itself.
marker_env=$(docker run --rm -i --network none "$LOCAL_PYTHON_IMAGE" python3 - --print-env \
    <docker/pip-download-for.py)
py_version=$(printf '%s' "$marker_env" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["python_full_version"])')

requirements=$("$python" -c '
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]))')
want_wheels="$marker_env
$requirements"
if [ -f "$out/wheels/.requirements" ] && [ "$(cat "$out/wheels/.requirements")" = "$want_wheels" ]; then
    log "have $out/wheels ($(find "$out/wheels" -name '*.whl' | wc -l) wheels)"
else
    log "downloading wheels for Python $py_version into $out/wheels"
    rm -rf "$out/wheels"
    mkdir -p "$out/wheels"
    # Binary wheels only: the image builds none of them (and has no compiler for it at run time).
    printf '%s\n' "$requirements" >"$out/wheels/requirements.txt"
    printf '%s\n' "$marker_env" >"$out/wheels/marker-env.json"
    "$python" docker/pip-download-for.py "$out/wheels/marker-env.json" --quiet \
        --disable-pip-version-check --only-binary=:all: -d "$out/wheels" -r "$out/wheels/requirements.txt"
    rm "$out/wheels/requirements.txt" "$out/wheels/marker-env.json"
    printf '%s\n' "$want_wheels" >"$out/wheels/.requirements"
fi

want_vendor=$(sha256sum Cargo.lock | cut -d' ' -f1)
if [ -f "$out/vendor/.cargo-lock" ] && [ "$(cat "$out/vendor/.cargo-lock")" = "$want_vendor" ]; then
    log "have $out/vendor"
else
    wait_quiet
    log "vendoring the crates of Cargo.lock into $out/vendor"
    rm -rf "$out/vendor"
    cargo vendor --quiet --locked "$out/vendor" >/dev/null
    printf '%s\n' "$want_vendor" >"$out/vendor/.cargo-lock"
fi
