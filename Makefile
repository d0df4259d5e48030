# digilut — `make help` lists the targets (generated from the `##` comments).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := pocl-opencl-icd libusb-1.0-0 libopengl0 libgl1 libxcb-xinerama0 libxcb-icccm4 libxcb-keysyms1
PYTEST_ARGS ?=

# Container images and compiled pipelines share one registry and one immutable tag.
REGISTRY ?= ghcr.io/digilut
TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
export DIGILUT_REGISTRY := $(REGISTRY)
export DIGILUT_TAG := $(TAG)

.PHONY: help install apt test lint format bench demo compile images push submit clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

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

install: apt $(STAMP) ## Create .venv with the pinned dependencies (idempotent; a second run is instant)

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

clean: ## Remove caches and generated outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache bench-out demo-out
