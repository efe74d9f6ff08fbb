# One word each: `make serve` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 2020

BACKEND ?= docker
IMAGE ?= sdxl:latest

.PHONY: install serve test bench image smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Imports the default model when the store holds none (tiny-sdxl, loudly, when the hub is out of reach).
serve: install
	$(PY) -m models ensure-default
	$(VENV)/bin/bentoml serve service:SDXL --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/serving_overhead.py

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
