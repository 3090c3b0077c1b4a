# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing.
# `make test` runs ruff, the import-layer contracts (lint-imports, see pyproject.toml) and pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test` (each runs torch single-threaded, see tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: demo test lint format bench clean setup fuzz

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(PYTHON) $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m attnopt.cli demo

test: $(STAMP)
	$(VENV)/bin/ruff check attnopt tests benchmarks examples
	$(VENV)/bin/ruff format --check attnopt tests benchmarks examples
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist load --durations=25 tests

# Long differential fuzzing of detection/fusion and the IR parser (tests/fuzz); the CI profile
# runs inside `make test`. FUZZ_EXAMPLES programs in all, single-threaded, no xdist workers.
FUZZ_EXAMPLES ?= 20000

fuzz: $(STAMP)
	OMP_NUM_THREADS=1 ATTNOPT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider -p no:xdist --hypothesis-show-statistics tests/fuzz tests/regressions

format: $(STAMP)
	$(VENV)/bin/ruff format attnopt tests benchmarks examples
	$(VENV)/bin/ruff check --fix attnopt tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
