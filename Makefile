# Quick start: `make demo` (the main job on the embedded default) and `make test` (all tests).
# Both run scripts/setup.sh first, which creates .venv and installs everything (idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

setup:
	@bash scripts/setup.sh

demo: setup
	@OMP_NUM_THREADS=2 .venv/bin/meml demo $(DEMO_ARGS)

test: setup
	@OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	@OMP_NUM_THREADS=1 $(PY) -m pytest -m "not distributed and not e2e and not slow" $(PYTEST_ARGS)

clean:
	rm -rf .venv .pytest_cache
