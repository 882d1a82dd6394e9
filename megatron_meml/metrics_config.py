"""Logging configuration (the metric sinks are in metrics.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Where metrics go and how progress shows."""

    jsonl: bool = True
    """Write metrics.jsonl in the run directory."""
    tensorboard: bool = True
    """Write TensorBoard events in the run directory."""
    wandb: bool = False
    """Log to Weights & Biases when installed (offline mode works without a network)."""
    wandb_project: Optional[str] = None
    """W&B project name."""
    progress: str = "line"
    """line (one line per step) or bar (tqdm)."""

    def __post_init__(self) -> None:
        if self.progress not in ("line", "bar"):
            raise ValueError(f"logging.progress must be line or bar, got '{self.progress}'")
