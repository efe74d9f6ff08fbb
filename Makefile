# One word each: `make serve` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 2020

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

BACKEND ?= docker
IMAGE ?= sdxl:latest

.PHONY: install test-programs serve lint docs docs-build test test-quick test-busy bench gpu-wheels image smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	@echo "==> creating the virtual environment in $(VENV)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "==> installing the pinned packages (torch, diffusers, bentoml...) and the test clients: a few minutes the first time"
	$(PY) -m pip install --progress-bar off -e ".[test]" | grep -E "^(Collecting|Successfully installed)" | cut -c1-100
	@echo "==> installed"
	touch $@

# What the tests run besides Python, from Debian's packages when missing: Chromium, which the
# playground's browser tests drive through Playwright (Playwright's own browser download comes
# from outside the package registries), a Redis server for the shared-store tests, and Node.js
# for @saintno/comfyui-sdk (npm, pinned in tests/comfyui_sdk), a real client of the ComfyUI dialect.
SDK := tests/comfyui_sdk
test-programs:
	@missing=""; \
	for program in chromium redis-server node npm; do command -v $$program >/dev/null || missing="$$missing $$program"; done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing$$missing (Debian packages) for the browser, Redis and ComfyUI client tests: a minute or so"; \
	  $(SUDO) apt-get update -q | tail -1 && \
	  $(SUDO) apt-get install -y -q $$(echo $$missing | sed 's/\bnode\b/nodejs/') | grep -E "^Setting up" | cut -c1-80; \
	fi
	@[ $(SDK)/node_modules/.package-lock.json -nt $(SDK)/package-lock.json ] || { \
	  echo "==> installing @saintno/comfyui-sdk (npm) for the ComfyUI client tests"; \
	  cd $(SDK) && npm ci --no-audit --no-fund --loglevel=error; }

# Imports the default model when the store holds none (tiny-sdxl, loudly, when the hub is out of reach).
serve: install
	$(PY) -m models ensure-default
	$(VENV)/bin/bentoml serve service:SDXL --host $(HOST) --port $(PORT)

# ruff: the lint rules and the formatting (pyproject.toml [tool.ruff]); `ruff format` fixes the latter.
# mypy: the types of the server's own code (pyproject.toml [tool.mypy]).
CODE := backends models service.py tests bench
lint: install
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/mypy backends models service.py

# The docs site (docs/, mkdocs.yml): `make docs` serves it with live reload; `make test` builds it
# with --strict, so a broken link or anchor fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# On three pytest-xdist workers, the tests that share a server grouped on one (tests/conftest.py).
# Three on two cores: part of each worker's time is spent waiting (on a server's start, a
# subprocess, a TTL), and the third fills it (docs/development.md has the figures).
WORKERS ?= 3
test: install test-programs lint docs-build
	$(PY) -m pytest -n $(WORKERS) --dist loadgroup

# The in-process part alone (no `bentoml serve` processes): a minute or two.
test-quick: install
	$(PY) -m pytest -m "not served"

# The served jobs and reliability tests again, beside two busy loops that keep both cores of a
# 2-core machine busy (`pytest --busy N`): what a loaded CI runner does to timing. CI runs it.
test-busy: install
	$(PY) -m pytest --busy 2 -m served tests/test_jobs.py tests/test_reliability.py

bench: install
	$(PY) bench/serving_overhead.py

# What bench/gpu_lease.sh carries to a lent GPU machine (Python 3.12 there, no registry): the
# pinned diffusers and torchao, as wheels in .whl/.
gpu-wheels:
	@echo "==> downloading diffusers and torchao (as requirements.txt pins them) for Python 3.12 into .whl/"
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  -d .whl $$(grep -E "^(diffusers|torchao)==" requirements.txt)

# The OCI image: bento (service, code, the models SDXL_MODELS names, else all stored) + containerize.
# `make image BACKEND=buildah` where there is no Docker daemon.
image: install
	$(PY) -m models ensure-default
	tag=$$($(VENV)/bin/bentoml build --output tag | tail -1 | sed 's/^__tag__://') && \
	$(VENV)/bin/bentoml containerize --backend $(BACKEND) -t $(IMAGE) $$tag

# Build, start and exercise the image (tiny-sdxl by default); on demand, not part of `make test`.
smoke:
	scripts/container_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache
