# mlaas4hep: `make run` sets up and runs the demo pipeline; `make test` sets up and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format down docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-packages.sh
	bash scripts/install-system-packages.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## run: start the embedded platform and run the demo pipeline over HTTP
run: setup
	$(BIN)/mlaas4hep up
	$(BIN)/mlaas4hep demo

## test: lint, then the whole test suite
test: setup lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check mlaas4hep tests benchmarks
	$(BIN)/ruff format --check mlaas4hep tests benchmarks

format: setup
	$(BIN)/ruff format mlaas4hep tests benchmarks
	$(BIN)/ruff check --fix mlaas4hep tests benchmarks

## down: stop the embedded platform
down: setup
	$(BIN)/mlaas4hep down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
