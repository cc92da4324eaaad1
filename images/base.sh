#!/usr/bin/env bash
# Builds a Python base image for images/Dockerfile from Debian packages alone, for machines that reach a Debian
# mirror but no container registry (python:3.11-slim cannot be pulled there):
#
#   images/base.sh [TAG]          (default TAG: localhost/kfp-finetune-python:3.11-bookworm; needs root)
#   make image TARGETS=cpu PYTHON_IMAGE=localhost/kfp-finetune-python:3.11-bookworm
#
# mmdebstrap writes a minimal bookworm root file system with Debian's python3.11 (venv and pip included),
# ca-certificates and passwd (useradd); /usr/local/bin/python3 links to python3.11, where images/Dockerfile's cpu
# stage expects python.org's interpreter. The engine (images/engine.sh) imports the tarball as an image.
# DEBIAN_MIRROR and DEBIAN_SECURITY_MIRROR pick other mirrors (defaults: deb.debian.org over http).
# Extra CA certificates are not baked in here: pass them to the image build (`make image EXTRA_CA_CERTS=FILE`).
set -euo pipefail

tag=${1:-localhost/kfp-finetune-python:3.11-bookworm}
here=$(cd "$(dirname "$0")" && pwd)
engine=$("$here/engine.sh")
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
command -v mmdebstrap >/dev/null || { echo "base.sh: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
started=$SECONDS
mmdebstrap --quiet --variant=minbase \
    --include=ca-certificates,passwd,python3.11,python3.11-venv,python3-pip \
    --customize-hook='ln -sf /usr/bin/python3.11 "$1/usr/local/bin/python3"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb' \
    bookworm "$tmp/rootfs.tar" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security bookworm-security main"
"$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tmp/rootfs.tar" "$tag" >/dev/null
"$engine" run --rm "$tag" python3 -c 'import sys, venv, ensurepip; print("python", sys.version.split()[0])' \
    | sed "s|^|base.sh: $tag: |"
echo "base.sh: built $tag with $engine in $((SECONDS - started)) s"
