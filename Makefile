# Trainyard: `make demo` sets up and runs the demo; `make test` sets up and runs the checks and tests.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin
STAMP := $(VENV)/.trainyard-installed

.PHONY: setup services lint test demo bench clean

setup: $(STAMP)

# Reinstalls only when the lock or the project metadata changed.
$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "setup: $(PYTHON) not found; Trainyard needs Python 3.11" >&2; exit 1; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --ignore-requires-python -r requirements.lock 2> >(grep -v "is ignored" >&2)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored" >&2)
	@touch $@

services:
	@scripts/services.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup services lint
	$(BIN)/pytest

demo: setup services
	$(BIN)/trainyard demo

bench: setup services
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
