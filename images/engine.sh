#!/usr/bin/env bash
# Prints the container engine that builds and runs kfp-finetune's images: `docker` where Docker with buildx answers,
# else `podman`. CONTAINER_ENGINE=docker|podman overrides the choice. Used by `make image`, images/base.sh and
# .ci/container-test.sh.
set -euo pipefail
if [[ -n ${CONTAINER_ENGINE:-} ]]; then
    [[ $CONTAINER_ENGINE == docker || $CONTAINER_ENGINE == podman ]] \
        || { echo "engine.sh: CONTAINER_ENGINE must be docker or podman, not '$CONTAINER_ENGINE'" >&2; exit 2; }
    echo "$CONTAINER_ENGINE"
elif command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    # A docker CLI alone is not enough: it needs buildx (the Dockerfile uses BuildKit mounts) and a daemon.
    echo docker
elif command -v podman >/dev/null 2>&1; then
    echo podman
else
    echo "engine.sh: neither Docker (with buildx and a running daemon) nor podman found;" \
         "install one (e.g. apt-get install podman buildah)" >&2
    exit 2
fi
