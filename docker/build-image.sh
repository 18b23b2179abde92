#!/usr/bin/env bash
# `make image`: the Dockerfile built with no registry and no index reachable from the build. The
# local base images (docker/local-images.sh) stand in for the public ones the Dockerfile names,
# and OFFLINE=1 makes it install the wheels and crates of docker/offline/ (docker/offline-inputs.sh);
# the build runs with no network at all, which proves nothing else is fetched.
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

need_docker
docker/local-images.sh
docker/offline-inputs.sh
wait_quiet
log "building $IMAGE"
docker build --network none --force-rm --tag "$IMAGE" \
    --build-arg OFFLINE=1 \
    --build-arg PYTHON_IMAGE="$LOCAL_PYTHON_IMAGE" \
    --build-arg BUILDER_IMAGE="$LOCAL_BUILDER_IMAGE" \
    --build-arg RUST_IMAGE="$LOCAL_RUST_IMAGE" \
    .
docker image ls "$IMAGE"
