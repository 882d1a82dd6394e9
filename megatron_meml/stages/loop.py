"""The step loop every training stage shares (MEF SFT and RIEL): progress, logging, stop handling and checkpoint
cadence. A stage supplies what one step does and what a checkpoint holds."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_meml.config import MemlConfig
from megatron_meml.errors import CheckpointError
from megatron_meml.stages.context import RunContext
from megatron_meml.stages.paths import RunPaths
from megatron_meml.training.checkpoint import RUN_STATE, latest_checkpoint


@dataclass(frozen=True)
class ResumePoint:
    """Where a stage starts: step 0, or a checkpoint of this run (checkpoint.resume)."""

    path: Optional[Path]
    """The checkpoint directory; None: a fresh start."""
    step: int


def resume_point(cfg: MemlConfig) -> ResumePoint:
    """checkpoint.resume: auto (the run's latest checkpoint, if any), none, or a checkpoint directory."""
    if cfg.checkpoint.resume == "none":
        return ResumePoint(None, 0)
    if cfg.checkpoint.resume == "auto":
        path = latest_checkpoint(RunPaths.of(cfg).checkpoints)
    else:
        path = Path(cfg.checkpoint.resume)
        if not (path / RUN_STATE).is_file():
            raise CheckpointError(f"checkpoint.resume='{path}' is not a complete checkpoint directory")
    if path is None:
        return ResumePoint(None, 0)
    return ResumePoint(path, int(json.loads((path / RUN_STATE).read_text())["step"]))


def run_steps(ctx: RunContext, *, stage: str, start: int, total: int, step: Callable[[int], dict[str, float]],
              checkpoint: Callable[[int], None], checkpoint_at_end: bool,
              finished: Callable[[], bool] = lambda: False,
              after_step: Optional[Callable[[int, bool], None]] = None) -> tuple[int, bool]:
    """Steps ``start+1 .. total`` (fewer once ``finished()``): each step's metrics are logged with a progress line;
    a checkpoint is written every checkpoint.save_every steps, when a rank was asked to stop, and at the end when
    ``checkpoint_at_end``. ``after_step(step, done)`` runs after the checkpoint. Collective. Returns (the last
    completed step, whether the loop stopped on a signal)."""
    every = ctx.cfg.checkpoint.save_every
    s = start
    while s < total and not finished():
        s += 1
        metrics = step(s)
        ctx.logger.log(s, metrics, stage=stage)
        ctx.logger.progress(s, total, metrics, stage=stage)
        stop = ctx.stop.agreed()
        done = s == total or finished()
        if stop or (done and checkpoint_at_end) or (every and s % every == 0):
            checkpoint(s)
        if after_step is not None:
            after_step(s, done)
        if stop:
            return s, True
    return s, False
