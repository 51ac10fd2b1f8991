# One target per task; the same commands locally, in pre-commit and in CI (.ci/run).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: up test lint format typecheck docs docs-check system-deps pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## up: the whole system (embedded PostgreSQL unless TIERLINE_DATABASE_URL is set), running
## the example application (examples/reports) on both tiers; TIERLINE_APP and
## TIERLINE_WEB_APP choose another (TIERLINE_WEB_APP= serves Tierline's API alone)
EXAMPLE_APP ?= examples.reports.jobs:app
EXAMPLE_WEB_APP ?= examples.reports.web:api
up: $(STAMP)
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
	TIERLINE_APP=$${TIERLINE_APP:-$(EXAMPLE_APP)} \
	TIERLINE_WEB_APP=$${TIERLINE_WEB_APP-$(EXAMPLE_WEB_APP)} \
	$(BIN)/tierline up $(ARGS)

## test: lint, types, generated docs, then the test suite against a real PostgreSQL
test: $(STAMP) system-deps lint typecheck docs-check pytest

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

format: $(STAMP)
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/tierline docs metrics > docs/metrics.md
	$(BIN)/tierline docs configuration > docs/configuration.md

docs-check: $(STAMP)
	@$(BIN)/tierline docs metrics | diff -u docs/metrics.md - \
	  || (echo "docs/metrics.md is stale: run 'make docs'"; exit 1)
	@$(BIN)/tierline docs configuration | diff -u docs/configuration.md - \
	  || (echo "docs/configuration.md is stale: run 'make docs'"; exit 1)

## system-deps: Debian tools the tests drive (promtool, chromium, pgbouncer)
system-deps:
	scripts/system-deps

bench: $(STAMP)
	bench/run-all

clean:
	rm -rf $(VENV) .tierline .pytest_cache .mypy_cache .ruff_cache test-artifacts
