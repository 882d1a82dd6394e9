"""Checkpoint configuration (the checkpoint code itself is in checkpoint.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When and where checkpoints are written, and what to resume from."""

    save_every: int = 50
    """Save every N steps (0: only at the end and on SIGTERM)."""
    keep_last: int = 2
    """How many step checkpoints to keep."""
    resume: str = "auto"
    """auto (latest in the run directory, if any), none, or a checkpoint directory."""
    load_optimizer: bool = True
    """Restore optimizer state when resuming."""

    def __post_init__(self) -> None:
        if self.save_every < 0:
            raise ValueError(f"checkpoint.save_every must be >= 0, got {self.save_every}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
