"""Where the tests find the real pretrained model (`make model` fetches it into .models/ before `make test`).

Outside CI a missing model skips the test with the command that fetches it; in CI (CI=true) it fails, because CI
runs `make test`, which fetches the model first, so a missing model there is a broken set-up, not a reason to skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from checkpoints_convert.models import SMOLLM2_135M_INSTRUCT, default_out, is_fetched

ROOT = Path(__file__).resolve().parents[1]


def real_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct HF directory, or skip / fail as above."""
    path = ROOT / default_out(SMOLLM2_135M_INSTRUCT)
    if is_fetched(SMOLLM2_135M_INSTRUCT, path):
        return path
    why = f"{path} is missing: run `make model` (python -m checkpoints_convert fetch smollm2-135m-instruct)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}; in CI (CI={os.environ['CI']}) the real model must be there")
    pytest.skip(why)
