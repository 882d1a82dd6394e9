"""A run directory (``<output_dir>/<run_name>``) and every path the stages write in it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_meml.config import MemlConfig
from megatron_meml.reporting.metrics import METRICS_FILE, SAMPLES_FILE
from megatron_meml.reporting.report import REPORT_DIR
from megatron_meml.reporting.samples import EVAL_DIR

STAGE_CONFIGS = ("train", "sft", "eval")
"""Stages whose resolved config a run directory may hold, in the order ``meml export`` reads them."""


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps what it writes."""

    root: Path

    @classmethod
    def of(cls, cfg: MemlConfig) -> "RunPaths":
        return cls(Path(cfg.output_dir) / cfg.run_name)

    @property
    def checkpoints(self) -> Path:
        """Resumable checkpoints: ``step_<N>/`` (model, optimizer, run state) and the ``latest`` marker."""
        return self.root / "checkpoints"

    @property
    def final_model(self) -> Path:
        """The finished stage's model weights (Megatron dist checkpoint, no optimizer state)."""
        return self.root / "final_model"

    @property
    def rollout_model(self) -> Path:
        """The rollout engine's start directory (config.json and tokenizer stay for ``meml export``)."""
        return self.root / "rollout_model"

    @property
    def hard_examples(self) -> Path:
        return self.root / "hard_examples"

    @property
    def traces(self) -> Path:
        """``meml traces`` output unless traces.out_dir says otherwise."""
        return self.root / "traces"

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES_FILE

    @property
    def eval_dir(self) -> Path:
        """Per-problem evaluation files, ``step_<N>.jsonl``."""
        return self.root / EVAL_DIR

    @property
    def library_log(self) -> Path:
        """Output of the libraries underneath (vLLM, Megatron, torch) when ``meml demo`` runs the stages."""
        return self.root / "libraries.log"

    def config(self, stage: str) -> Path:
        """The resolved config a stage ran with."""
        return self.root / f"config.{stage}.yaml"
