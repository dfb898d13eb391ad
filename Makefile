# `make run` and `make test` work from a fresh clone: they create .venv and
# install everything the first time (and again when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast check lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

run: $(STAMP)  ## start the daemon in the foreground on the embedded dev config (./.jobd/)
	$(BIN)/jobd --dev

test: $(STAMP)  ## the whole suite, slow end-to-end tests included (what CI runs)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

lint: $(STAMP)
	$(BIN)/ruff check jobd tests benchmarks
	$(BIN)/ruff format --check jobd tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP)  ## throughput and latency; prints JSON
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .jobd build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
