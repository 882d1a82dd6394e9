"""Stage 1, MEF (multi-expert fine-tuning): SFT on (expert prompt, question, expert answer) for every expert."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

from megatron_meml.config import MemlConfig
from megatron_meml.data.sampler import ProblemSampler
from megatron_meml.errors import DataError
from megatron_meml.stages.batching import sft_rows, to_train_batch
from megatron_meml.stages.context import close_run, setup_run
from megatron_meml.stages.evaluate import evaluate
from megatron_meml.stages.loop import resume_point, run_steps
from megatron_meml.training.checkpoint import (load_checkpoint, rng_state, save_checkpoint, save_model_weights,
                                               set_rng_state)


def run_sft(cfg: MemlConfig) -> Path:
    """Collective. Trains train.sft_steps steps at train.sft_lr (each SFT row at weight 1 over the SFT rows' own
    count, whatever the recipe's algo.lambda_sft and algo.aux_normaliser, which weigh RIEL's hard-example rows);
    returns the model directory. Evaluates the result when eval.max_problems > 0."""
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, lambda_sft=1.0, aux_normaliser="own"))
    resume = resume_point(cfg)
    ctx = setup_run(cfg, "sft", resume_step=resume.step if resume.path else None)
    examples, _ = ctx.experts.mef_examples(ctx.train_problems)
    if not examples:
        raise DataError("MEF: no SFT examples (no gold solutions or teacher traces for any expert)")
    if ctx.is_writer:
        counts = Counter(x.expert for x in examples)
        print("[sft] MEF rows: " + ", ".join(
            f"{e.id} {counts[e.index]} ({e.style + ' style' if e.style else 'gold' if e.index == 0 else 'traces'})"
            for e in ctx.experts.experts), flush=True)
    sampler = ProblemSampler(examples, seed=cfg.seed, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
    if resume.path:
        rs = load_checkpoint(resume.path, ctx.state)
        sampler.load_state_dict(rs["sampler"])
        set_rng_state(rs["rng"])
    if cfg.eval.max_problems and cfg.eval.at_start and resume.path is None:
        ctx = ctx.with_rollout()
        evaluate(ctx, 0)
        ctx.rollout.sleep()
    ctx.stop.install()
    per_rank = max(1, cfg.train.sft_batch_size // ctx.dp_size)

    def step(_: int) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = to_train_batch(sft_rows(sampler.next_batch(per_rank)), ctx.pad_id,
                               max_len=ctx.arch.max_position_embeddings)
        metrics = ctx.trainer.train_step(batch)
        metrics["timing/step"] = time.perf_counter() - t0
        return metrics

    def checkpoint(s: int) -> None:
        save_checkpoint(ctx.paths.checkpoints, s, ctx.state, {"sampler": sampler.state_dict(), "rng": rng_state()},
                        keep_last=cfg.checkpoint.keep_last)

    last, stopped = run_steps(ctx, stage="sft", start=resume.step, total=cfg.train.sft_steps, step=step,
                              checkpoint=checkpoint, checkpoint_at_end=False)
    if stopped:
        close_run(ctx)
        raise SystemExit(0)
    out = save_model_weights(ctx.paths.final_model, ctx.state.model)
    if cfg.eval.max_problems:
        if ctx.rollout is None:
            ctx = ctx.with_rollout()
        else:
            ctx.rollout.sync()
        evaluate(ctx, last)
    close_run(ctx)
    return out
