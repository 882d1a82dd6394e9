"""Unit-test fixtures: the shared benchmark copies (../shared/data next to the repository)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the local benchmark copies; tests that need them skip (saying where they looked) without them."""
    if not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file():
        pytest.skip(f"benchmark copies not found at {SHARED_DATA} (clone shared/ next to the repository)")
    return SHARED_DATA
