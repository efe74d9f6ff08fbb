# One word each: `make serve` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 2020

.PHONY: install serve test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
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

clean:
	rm -rf $(VENV) .pytest_cache
