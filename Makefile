# kfp-finetune developer commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Processes for the default suite (pytest-xdist): most tests keep one core busy at a time, so one per core ("auto").
# --dist loadfile keeps each test module on one worker, so its module-scoped fixtures (trained models) are built once;
# --no-loadscope-reorder hands the modules out in collection order, heaviest first (tests/conftest.py HEAVY_MODULES).
# One TensorFlow thread per worker (unless TEST_WORKERS=0: one process): with one worker per core, TensorFlow's
# default pools (one thread per core in each worker) make the workers contend. Idle 2-core machine: 291 s instead of
# 303-321 s for the suite.
TEST_WORKERS ?= auto
# Slow tests train real models and run whole pipelines (2-3 GB each): two at a time, whatever the core count.
SLOW_WORKERS ?= 2
# Which tests test-slow runs: CI runs the `image` ones (pip installs) beside the others, off the two workers.
SLOW_MARK ?= slow
# Components run as subprocesses that call `python3`: put the venv first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
# pytest keeps its assertion-rewritten test modules as .pyc files; PYTHONDONTWRITEBYTECODE=1 (set on some machines)
# turns that off, and then every xdist worker parses and rewrites all test modules again at every run (~4 s each).
export PYTHONDONTWRITEBYTECODE :=
export KFP_FINETUNE_WEIGHTS_MIRROR ?= $(if $(wildcard ../shared/data/weights),$(abspath ../shared/data/weights),)

REGISTRY ?= ghcr.io/kfp-finetune
IMAGE_NAME ?= $(REGISTRY)/kfp-finetune
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' components/__init__.py)
GIT_SHA := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-slow test-image test-all test-container lint format bench compile image base-image push lock clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --quiet --upgrade pip
	$(BIN)/pip install --quiet --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed ## create .venv and install the project with pinned dependencies

demo: setup ## run the whole pipeline locally on the embedded sample (the README's main command)
	$(BIN)/kfp-finetune run --output out/demo

test: setup ## lint, then the default test suite, over TEST_WORKERS processes (goal ≤5 minutes on an idle 2-core machine; no slow tests)
	$(BIN)/ruff check .
	$(if $(filter 0,$(TEST_WORKERS)),,TF_NUM_INTRAOP_THREADS=$${TF_NUM_INTRAOP_THREADS:-1} \
	TF_NUM_INTEROP_THREADS=$${TF_NUM_INTEROP_THREADS:-1}) $(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10

test-slow: setup ## the tests marked slow (run in CI too), over SLOW_WORKERS processes (2: 1085 s instead of 1504 s on an idle 2-core machine)
	$(BIN)/python -m pytest -m "$(SLOW_MARK)" -q -n $(SLOW_WORKERS) --maxschedchunk 1 --durations=15 || [ $$? -eq 5 ]  # 5: none collected

test-image: setup ## the image's install steps without Docker (marked slow and image; CI runs them beside test-slow)
	$(BIN)/python -m pytest -m image -q --durations=5

test-all: setup ## every test
	$(BIN)/python -m pytest -q

lint: setup ## ruff, and hadolint on the Dockerfile
	$(BIN)/ruff check .
	$(BIN)/hadolint images/Dockerfile

format: setup ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup ## run every benchmark (writes bench/results/*.json and *.md)
	for b in bench/ingest.py bench/train.py bench/pipeline.py bench/tflite.py; do $(BIN)/python $$b || exit 1; done

compile: setup ## compile the pipeline to pipeline.yaml (IMAGE=... to override the image)
	$(BIN)/kfp-finetune compile --output pipeline.yaml $(if $(IMAGE),--image $(IMAGE),)

# Container images (images/Dockerfile; build context: the repository root). Tags are immutable: VERSION (from
# components/__init__.py) and VERSION-GIT_SHA; the gpu target adds -gpu. `buildcache-*` tags only feed --cache-from.
SOURCE ?= https://github.com/kfp-finetune/kfp-finetune
PLATFORM ?= linux/amd64
# $(call buildx,TARGET,TAG_SUFFIX): one target's build command, without its output flag and context.
buildx = docker buildx build --file images/Dockerfile --target $(1) --platform $(PLATFORM) \
	--build-arg VERSION=$(VERSION) --build-arg REVISION=$(GIT_SHA) --build-arg SOURCE=$(SOURCE) $(BUILD_ARGS) \
	--cache-from type=registry,ref=$(IMAGE_NAME):buildcache-$(1) \
	--tag $(IMAGE_NAME):$(VERSION)$(2) --tag $(IMAGE_NAME):$(VERSION)-$(GIT_SHA)$(2)
# `make image`: Docker with buildx where it answers, else podman (images/engine.sh; CONTAINER_ENGINE=... forces one).
# TARGETS=cpu skips the gpu image; PYTHON_IMAGE=... replaces the cpu base (images/base.sh builds one without a
# registry); EXTRA_CA_CERTS=FILE (PEM) adds CA certificates that pip inside the build must trust (TLS-intercepting
# proxies); PIP_INDEX_URL=... a PyPI mirror.
ENGINE = $(shell images/engine.sh)
TARGETS ?= cpu gpu
BUILD_ARGS = $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE),) \
	$(if $(PIP_INDEX_URL),--build-arg PIP_INDEX_URL=$(PIP_INDEX_URL),) \
	$(if $(EXTRA_CA_CERTS),--build-arg EXTRA_CA_CERTS="$$(cat $(EXTRA_CA_CERTS))",)
podman_build = podman build --file images/Dockerfile --target $(1) --platform $(PLATFORM) --layers \
	--build-arg VERSION=$(VERSION) --build-arg REVISION=$(GIT_SHA) --build-arg SOURCE=$(SOURCE) $(BUILD_ARGS) \
	--tag $(IMAGE_NAME):$(VERSION)$(2) --tag $(IMAGE_NAME):$(VERSION)-$(GIT_SHA)$(2)
img_suffix = $(if $(filter gpu,$(1)),-gpu,)
define image_build
$(if $(filter docker,$(ENGINE)),$(call buildx,$(1),$(call img_suffix,$(1))) --load .,$(call podman_build,$(1),$(call img_suffix,$(1))) .)

endef

image: ## build the images locally with Docker buildx or podman (TARGETS=cpu, PYTHON_IMAGE=, EXTRA_CA_CERTS=FILE)
	$(foreach t,$(TARGETS),$(call image_build,$(t)))

test-container: ## the CI container stage: build the cpu image with podman, run the demo in it (root; apt-get)
	.ci/container-test.sh

base-image: ## build a Python base image from Debian packages when no registry is reachable (images/base.sh; root)
	images/base.sh $(BASE_TAG)

push: ## build and push both images to REGISTRY (refuses a dirty tree or an already pushed VERSION)
	@git diff --quiet HEAD -- || { echo "push: commit your changes first; tags name $(GIT_SHA)" >&2; exit 1; }
	@for tag in $(VERSION) $(VERSION)-gpu; do \
	  if docker buildx imagetools inspect $(IMAGE_NAME):$$tag >/dev/null 2>&1; then \
	    echo "push: $(IMAGE_NAME):$$tag exists; tags are immutable, bump __version__ in components/__init__.py" >&2; \
	    exit 1; fi; done
	$(call buildx,cpu,) --tag $(IMAGE_NAME):buildcache-cpu --cache-to type=inline --push .
	$(call buildx,gpu,-gpu) --tag $(IMAGE_NAME):buildcache-gpu --cache-to type=inline --push .

lock: ## regenerate constraints.txt from a fresh venv
	rm -rf /tmp/kfp-finetune-lock && $(PYTHON) -m venv /tmp/kfp-finetune-lock
	/tmp/kfp-finetune-lock/bin/pip install --quiet '.[dev]'
	(echo "# Pinned versions for CI, the dev venv and the container images. Regenerate with 'make lock'."; \
	 /tmp/kfp-finetune-lock/bin/pip freeze --exclude-editable | grep -v '^kfp-finetune'; echo "tensorflow==2.21.0") > constraints.txt

clean: ## remove build outputs (keeps .venv)
	rm -rf build dist *.egg-info out .pytest_cache
