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
    samples_per_step: int = 4
    """Completions kept per RIEL step and per evaluation (<run_dir>/samples.jsonl, TensorBoard text, the report);
    picked by a seed of the step, spread over experts. 0: none."""
    sample_prompt_chars: int = 0
    """Also keep the last this many characters of each sample's rendered prompt (chat template included); 0: only
    the question text."""

    def __post_init__(self) -> None:
        for name in ("samples_per_step", "sample_prompt_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"logging.{name} must be >= 0, got {getattr(self, name)}")
        if self.progress not in ("line", "bar", "off"):
            raise ValueError(f"logging.progress must be line, bar or off, got '{self.progress}'")
