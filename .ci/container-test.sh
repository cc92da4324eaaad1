#!/usr/bin/env bash
# CI stage "container": what ships, run here. Builds the real `cpu` image from images/Dockerfile with podman, runs
# the no-argument demo's compiled pipeline end to end with `kfp-finetune run --runner docker` (every step a container
# of that image, as uid 1000, through kfp.local.DockerRunner on podman's Docker-compatible socket), checks the
# blessed export, then checks that a run whose ingest step fails (a bad source) fails.
#
# Needs root (apt-get, rootful podman), Debian 12 or similar, and the project's venv (.venv; `make setup` makes it
# when missing). No container registry is needed: the Python base image is built from Debian packages
# (images/base.sh). The host's extra CA certificates (/usr/local/share/ca-certificates, for TLS-intercepting
# proxies) are passed to the build. Runnable alone: .ci/container-test.sh
#
# Two halves: `.ci/container-test.sh build` (apt-get, the base image, the cpu image: mostly network and disk) and
# `.ci/container-test.sh run` (the demo and the failing run in the image; builds the image first if it is missing).
# No argument: both. .ci/run starts `build` in the background before the test stages and `run` after them.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
case $mode in
    all | build | run) ;;
    *) echo "usage: $0 [build|run]   (no argument: both)" >&2; exit 2 ;;
esac

started=$SECONDS
phase_started=$SECONDS
phase() {
    if [[ -n ${phase_name:-} ]]; then
        echo "== container-test: $phase_name: $((SECONDS - phase_started)) s"
    fi
    phase_name=$1
    phase_started=$SECONDS
    [[ -n $phase_name ]] && echo "== container-test: $phase_name ..."
    return 0
}
fail() {
    echo "container-test: FAILED: $*" >&2
    exit 1
}

VENV=${VENV:-.venv}
BASE_IMAGE=${BASE_IMAGE:-localhost/kfp-finetune-python:3.11-bookworm}
IMAGE_NAME=${IMAGE_NAME:-localhost/kfp-finetune}

# The version as the Makefile reads it (the build half runs before `make setup` has made the venv).
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' components/__init__.py)
[[ -n $version ]] || fail "no __version__ in components/__init__.py"
image="$IMAGE_NAME:$version"

# Everything of this stage lives here; every folder a step's container reads must be enterable by uid 1000.
work=$(mktemp -d /tmp/kfp-finetune-container-test.XXXXXX)
chmod 755 "$work"
service_pid=""
cleanup() {
    if [[ -n $service_pid ]]; then
        kill "$service_pid" 2>/dev/null || true
        wait "$service_pid" 2>/dev/null || true
    fi
    rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

# podman's defaults fail on this kind of machine (rlimits, systemd cgroups); these settings work.
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$work/containers.conf
export CONTAINER_ENGINE=podman

build() {
    phase "apt-get install podman and friends"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq podman buildah mmdebstrap runc uidmap slirp4netns fuse-overlayfs >/dev/null
    podman --version

    phase "base image $BASE_IMAGE (mmdebstrap + podman import)"
    images/base.sh "$BASE_IMAGE"

    phase "make image TARGETS=cpu ($image)"
    ca_args=()
    shopt -s nullglob
    extra_cas=(/usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt)
    shopt -u nullglob
    if (( ${#extra_cas[@]} )); then
        cat "${extra_cas[@]}" >"$work/extra-ca.pem"
        ca_args=(EXTRA_CA_CERTS="$work/extra-ca.pem")
        echo "passing ${#extra_cas[@]} extra CA certificate file(s) to the build"
    fi
    make image TARGETS=cpu PYTHON_IMAGE="$BASE_IMAGE" IMAGE_NAME="$IMAGE_NAME" "${ca_args[@]}"
    podman run --rm "$image" sh -c 'test "$(id -u)" = 1000 && python -c "import tensorflow, kfp, kfp_finetune.components, kfp_finetune.pipelines"' \
        || fail "$image does not run as uid 1000 with TensorFlow, kfp and kfp-finetune importable"
}

if [[ $mode == build ]]; then
    build
    phase ""
    echo "== container-test: image built in $((SECONDS - started)) s"
    exit 0
fi
# `run` alone builds when this commit's image is missing (tagged VERSION-GIT_SHA by `make image`).
commit_image="$image-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [[ $mode == all ]] || ! command -v podman >/dev/null || ! podman image exists "$commit_image"; then
    build
fi

if [[ ! -x $VENV/bin/kfp-finetune ]]; then
    phase "make setup"
    make setup
fi
"$VENV/bin/python" -c 'import docker' 2>/dev/null || fail "the docker package is missing from $VENV: re-run make setup"

phase "podman's Docker-compatible socket"
socket=$work/podman.sock
podman system service --time=0 "unix://$socket" >"$work/podman-service.log" 2>&1 &
service_pid=$!
for _ in $(seq 60); do
    [[ -S $socket ]] && break
    sleep 0.5
done
[[ -S $socket ]] || { cat "$work/podman-service.log" >&2; fail "podman system service did not create $socket"; }
export DOCKER_HOST=unix://$socket

# The same weights the other stages use, when this machine has them (the demo falls back to random weights else).
if [[ -z ${KFP_FINETUNE_WEIGHTS_MIRROR:-} ]]; then
    for candidate in "${KFP_FINETUNE_SHARED_DATA:-../shared/data}/weights" ../shared/data/weights; do
        if [[ -d $candidate ]]; then
            export KFP_FINETUNE_WEIGHTS_MIRROR=$(cd "$candidate" && pwd)
            break
        fi
    done
fi
demo_params=()
if [[ -n ${KFP_FINETUNE_WEIGHTS_MIRROR:-} ]]; then
    echo "weights mirror: $KFP_FINETUNE_WEIGHTS_MIRROR"
else
    # Without ImageNet weights the demo's backbone may start from random weights: bless whatever it scores, so that
    # the export is still checked.
    echo "weights mirror: none (the demo may fall back to random weights; min_accuracy=0)"
    demo_params=(--param min_accuracy=0)
fi

phase "the demo's compiled pipeline, every step in $image"
demo=$work/demo
"$VENV/bin/kfp-finetune" run --runner docker --image "$image" --output "$demo" "${demo_params[@]}" \
    | tee "$work/demo.out"
grep -qE '^  blessed +True$' "$work/demo.out" || fail "the demo's model was not blessed"
exported=$(find "$demo/pipeline_root" -path '*/export/exported_model' -type d | head -n 1)
[[ -n $exported && -f $exported/saved_model.pb ]] || fail "no exported SavedModel under $demo/pipeline_root"
"$VENV/bin/python" - "$exported" <<'EOF' || fail "the exported SavedModel does not classify"
import sys

import numpy as np
import tensorflow as tf
from PIL import Image
import io

model = tf.saved_model.load(sys.argv[1])
serve = model.signatures["serving_default"]
buf = io.BytesIO()
Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(buf, format="PNG")
out = serve(image_bytes=tf.constant([buf.getvalue()]))
probabilities = out["probabilities"].numpy()
assert probabilities.shape == (1, 10) and abs(float(probabilities.sum()) - 1) < 1e-3, probabilities
print("container-test: the exported SavedModel classifies:", out["class_name"].numpy()[0].decode())
EOF
# Every step ran in the image as uid 1000: it wrote every file of the run, and its log shows the container.
not_1000=$(find "$demo/pipeline_root" -mindepth 1 ! -uid 1000 | head -n 5)
[[ -z $not_1000 ]] || fail "files not written by uid 1000 (a step ran outside the image?): $not_1000"
for step in ingest backbone train-head fine-tune evaluate export; do
    grep -q "Found image '$image'" "$demo/logs/$step.log" || fail "step $step did not run in $image"
done
echo "container-test: 6 steps ran in $image as uid 1000; export at $exported"

phase "a failing step fails the run"
bad=$work/bad_source
mkdir -p "$bad/cats" "$bad/dogs"
echo "not an image" >"$bad/cats/one.jpg"
echo "not an image" >"$bad/dogs/two.jpg"
chmod -R a+rX "$bad"
set +e
"$VENV/bin/kfp-finetune" run --runner docker --image "$image" --source "$bad" --output "$work/bad" \
    >"$work/bad.out" 2>&1
code=$?
set -e
cat "$work/bad.out"
(( code != 0 )) || fail "a run whose ingest step fails exited 0"
grep -q "step ingest failed" "$work/bad.out" || fail "the failed run does not name the ingest step"
grep -q "Found image '$image'" "$work/bad/logs/ingest.log" || fail "the failing ingest did not run in $image"
echo "container-test: the failing step failed the run (exit $code)"

phase ""
echo "== container-test: passed in $((SECONDS - started)) s"
