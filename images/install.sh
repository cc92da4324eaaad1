#!/usr/bin/env bash
# The one recipe that builds and installs kfp-finetune into a container image. images/Dockerfile runs it, and
# tests/integration/test_image_install.py runs the same file in a fresh virtualenv, so CI exercises the real steps.
#
#   install.sh wheel   SRC_DIR DIST_DIR                 build the project's wheel (the builder stage) with
#                                                       $PYTHON (default python3)
#   install.sh venv    PYTHON VENV_DIR                  create the runtime virtualenv with PYTHON
#   install.sh install VENV_DIR DIST_DIR CONSTRAINTS EXTRA [VERSION]
#                                                       install the wheel with its `EXTRA` (cpu | gpu) under the
#                                                       pinned CONSTRAINTS, kfp included (components set
#                                                       install_kfp_package=False), then check that the package
#                                                       imports, that the CLI answers and, when VERSION is given,
#                                                       that it equals the package's version.
#   install.sh resolve VENV_DIR DIST_DIR CONSTRAINTS EXTRA REPORT_JSON
#                                                       the same install as a dry run: pip's JSON report of what
#                                                       it would install (CI checks the gpu target this way
#                                                       without downloading CUDA).
#
# pip's cache is left to the caller: the Dockerfile mounts a BuildKit cache (kept out of the image), a developer or
# CI machine uses its own. The pip flags are here and only here.
set -euo pipefail

PIP_FLAGS=(--disable-pip-version-check --no-input --progress-bar off)
# The distro's or python.org's bundled pip differs per base image; the same pip resolves the same way everywhere.
PIP_VERSION=26.3

die() {
    echo "install.sh: $*" >&2
    exit 2
}

build_wheel() {
    local src=$1 dist=$2
    [[ -f "$src/setup.cfg" ]] || die "no setup.cfg in $src: pass the project root"
    mkdir -p "$dist"
    # --no-deps: only our wheel; dependencies are resolved at install time under the constraints.
    "${PYTHON:-python3}" -m pip wheel "${PIP_FLAGS[@]}" --no-deps --wheel-dir "$dist" "$src"
}

make_venv() {
    local python=$1 venv=$2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" "pip==$PIP_VERSION"
    "$venv/bin/python" -c 'import sys; assert sys.version_info[:2] >= (3, 10), sys.version'
}

# The pip command line of the install, checked arguments first; extra pip options may follow.
pip_install() {
    local venv=$1 dist=$2 constraints=$3 extra=$4
    shift 4
    [[ -x "$venv/bin/python" ]] || die "$venv is not a virtualenv (run: install.sh venv PYTHON $venv)"
    [[ -f "$constraints" ]] || die "constraints file $constraints not found"
    [[ $extra == cpu || $extra == gpu ]] || die "EXTRA must be cpu or gpu, not '$extra'"
    local wheels=("$dist"/kfp_finetune-*.whl)
    [[ -f "${wheels[0]}" ]] || die "no kfp_finetune wheel in $dist (run: install.sh wheel SRC $dist)"
    (( ${#wheels[@]} == 1 )) || die "several kfp_finetune wheels in $dist: ${wheels[*]}"
    # beam: `ingest --runner dataflow` runs its Dataflow workers on this same image (issue 13, docs/scaling.md).
    "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" "$@" --constraint "$constraints" "${wheels[0]}[$extra,beam]"
}

install_wheel() {
    local venv=$1 dist=$2 constraints=$3 extra=$4 version=${5:-}
    pip_install "$venv" "$dist" "$constraints" "$extra"
    # A broken dependency set must fail the build, not the first pipeline run.
    "$venv/bin/python" -m pip check

    # Check the installed package, never a source tree that PYTHONPATH or the working directory would put first.
    local installed
    installed=$(cd / && env -u PYTHONPATH "$venv/bin/python" -c \
        'import kfp, kfp_finetune.pipelines, kfp_finetune.components as c; print(c.__version__)')
    if [[ -n $version && $version != "$installed" ]]; then
        die "image version $version != package version $installed (components/__init__.py): build with VERSION=$installed"
    fi
    (cd / && env -u PYTHONPATH "$venv/bin/kfp-finetune" --help >/dev/null)
    echo "install.sh: kfp-finetune $installed [$extra] installed in $venv"
}

case "${1:-}" in
    wheel) (( $# == 3 )) || die "usage: install.sh wheel SRC_DIR DIST_DIR"; build_wheel "$2" "$3" ;;
    venv) (( $# == 3 )) || die "usage: install.sh venv PYTHON VENV_DIR"; make_venv "$2" "$3" ;;
    install)
        (( $# == 5 || $# == 6 )) || die "usage: install.sh install VENV_DIR DIST_DIR CONSTRAINTS EXTRA [VERSION]"
        install_wheel "$2" "$3" "$4" "$5" "${6:-}"
        ;;
    resolve)
        (( $# == 6 )) || die "usage: install.sh resolve VENV_DIR DIST_DIR CONSTRAINTS EXTRA REPORT_JSON"
        pip_install "$2" "$3" "$4" "$5" --dry-run --quiet --ignore-installed --report "$6"
        ;;
    *) die "usage: install.sh {wheel|venv|install|resolve} ... (see the comment at the top of $0)" ;;
esac
