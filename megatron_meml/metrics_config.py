"""Logging configuration (the metric sinks are in metrics.py, the plots in report.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Where metrics go and how progress shows."""

    jsonl: bool = True
    """Write metrics.jsonl in the run directory (``meml report`` reads it)."""
    tensorboard: bool = True
    """Write TensorBoard events under <run_dir>/tb/<stage> (one TensorBoard run per stage)."""
    wandb: bool = False
    """Log to Weights & Biases when installed (offline mode when WANDB_MODE is unset and there is no API key)."""
    wandb_project: Optional[str] = None
    """W&B project name (None: "megatron-meml")."""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user); None: the account's default."""
    progress: str = "line"
    """line (one line per step with the key numbers), bar (tqdm), or off."""

    def __post_init__(self) -> None:
        if self.progress not in ("line", "bar", "off"):
            raise ValueError(f"logging.progress must be line, bar or off, got '{self.progress}'")
