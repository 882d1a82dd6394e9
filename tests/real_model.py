"""Where the tests find the real pretrained model (`make model` fetches it into .models/ before `make test`).

Outside CI a missing model skips the test with the command that fetches it; in CI (CI=true) it fails, because CI
runs `make test`, which fetches the model first, so a missing model there is a broken set-up, not a reason to skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".models" / "SmolLM2-135M-Instruct"


def real_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct HF directory, or skip / fail as above."""
    if (SMOLLM2 / "config.json").is_file() and list(SMOLLM2.glob("*.safetensors")):
        return SMOLLM2
    message = (f"the real model is not at {SMOLLM2}; fetch it with `make model` "
               "(python -m checkpoints_convert fetch smollm2-135m-instruct)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)
