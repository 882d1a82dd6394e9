"""The stages a user runs: MEF SFT (stage 1), RIEL (stage 2), evaluation. Each is collective."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

from megatron_meml.config import MemlConfig

log = logging.getLogger("megatron_meml")
FINAL_MODEL = "final_model"


def _run_dir(cfg: MemlConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def _resume_point(cfg: MemlConfig, root: Path) -> Optional[Path]:
    from megatron_meml.checkpoint import CheckpointError, latest_checkpoint

    if cfg.checkpoint.resume == "none":
        return None
    if cfg.checkpoint.resume == "auto":
        return latest_checkpoint(root)
    path = Path(cfg.checkpoint.resume)
    if not (path / "run_state.json").is_file():
        raise CheckpointError(f"checkpoint.resume='{path}' is not a complete checkpoint directory")
    return path


def _start_rollout(ctx, version: int = 0) -> None:
    """The engine on the current weights; ``version``: the optimizer steps they have had (a resumed RIEL step)."""
    from megatron_meml.rollout.distributed import DistributedRollout

    ctx.rollout = DistributedRollout.start(ctx.state.model, ctx.arch, ctx.experts.tokenizer, ctx.cfg.rollout,
                                           ctx.run_dir / "rollout_model", dtype=ctx.cfg.model.dtype,
                                           seed=ctx.cfg.seed, version=version)


def _finish(ctx) -> None:
    from megatron_meml.parallel import destroy_distributed
    from megatron_meml.report import write_report

    if ctx.rollout is not None:
        ctx.rollout.shutdown()
    ctx.logger.close()
    if ctx.is_writer:
        paths = write_report(ctx.run_dir)
        print(f"[report] {len(paths)} files in {ctx.run_dir / 'report'}", flush=True)
    destroy_distributed()


def run_sft(cfg: MemlConfig) -> Path:
    """Stage 1 (MEF): SFT on (expert prompt, question, expert answer) for all experts; returns the model dir."""
    from megatron_meml.batching import sft_rows, to_train_batch
    from megatron_meml.checkpoint import (load_checkpoint, rng_state, save_checkpoint, save_model_weights,
                                          set_rng_state)
    from megatron_meml.data.sampler import ProblemSampler
    from megatron_meml.evaluate import evaluate
    from megatron_meml.run import install_stop_handler, setup_run, stop_agreed

    root = _run_dir(cfg) / "checkpoints"
    resume = _resume_point(cfg, root)
    start = json.loads((resume / "run_state.json").read_text())["step"] if resume else 0
    ctx = setup_run(cfg, "sft", resume_step=start if resume else None)
    ctx.trainer.algo = dataclasses.replace(cfg.algo, lambda_sft=1.0)
    examples, reports = ctx.experts.mef_examples(ctx.train_problems)
    if not examples:
        raise ValueError("MEF: no SFT examples (no gold solutions or teacher traces for any expert)")
    sampler = ProblemSampler(examples, seed=cfg.seed, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
    if resume:
        rs = load_checkpoint(resume, ctx.state)
        sampler.load_state_dict(rs["sampler"])
        set_rng_state(rs["rng"])
    install_stop_handler(ctx)
    per_rank = max(1, cfg.train.sft_batch_size // ctx.dp_size)
    step = start
    while step < cfg.train.sft_steps:
        step += 1
        t0 = time.perf_counter()
        batch = to_train_batch(sft_rows(sampler.next_batch(per_rank)), ctx.pad_id,
                               max_len=ctx.arch.max_position_embeddings)
        metrics = ctx.trainer.train_step(batch)
        metrics["timing/step"] = time.perf_counter() - t0
        ctx.logger.log(step, metrics, stage="sft")
        ctx.logger.progress(step, cfg.train.sft_steps, metrics, stage="sft")
        stop = stop_agreed(ctx)
        if stop or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
            save_checkpoint(root, step, ctx.state, {"sampler": sampler.state_dict(), "rng": rng_state()},
                            keep_last=cfg.checkpoint.keep_last)
        if stop:
            _finish(ctx)
            raise SystemExit(0)
    out = save_model_weights(ctx.run_dir / FINAL_MODEL, ctx.state.model)
    if cfg.eval.max_problems:
        _start_rollout(ctx)
        evaluate(ctx, step)
    _finish(ctx)
    return out


def run_train(cfg: MemlConfig) -> Path:
    """Stage 2 (RIEL): the RL loop with mutual learning and hard-example replay; returns the model dir."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_meml.checkpoint import (load_ahead, load_checkpoint, rng_state, save_checkpoint, save_model_weights,
                                          set_rng_state)
    from megatron_meml.data.sampler import ProblemSampler
    from megatron_meml.evaluate import evaluate
    from megatron_meml.hard_examples.store import HardExampleStore
    from megatron_meml.loop import train_loop
    from megatron_meml.rollout.ahead import RolloutsAhead
    from megatron_meml.run import install_stop_handler, setup_run

    root = _run_dir(cfg) / "checkpoints"
    resume = _resume_point(cfg, root)
    start = json.loads((resume / "run_state.json").read_text())["step"] if resume else 0
    ctx = setup_run(cfg, "train", resume_step=start if resume else None)
    store = None
    if cfg.hard_examples.enabled:
        store = HardExampleStore(cfg.hard_examples, ctx.run_dir / "hard_examples", seed=cfg.seed,
                                 group=ps.get_data_parallel_group() if dist.get_world_size() > 1 else None)
    sampler = ProblemSampler(ctx.train_problems, seed=cfg.seed, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
    if cfg.rollout.max_staleness:
        ctx.ahead = RolloutsAhead(cfg.rollout.max_staleness)
    if resume:
        rs = load_checkpoint(resume, ctx.state, load_optimizer=cfg.checkpoint.load_optimizer)
        sampler.load_state_dict(rs["sampler"])
        set_rng_state(rs["rng"])
        ctx.completions = int(rs.get("completions", 0))  # checkpoints older than train.rollout_budget lack it
        if ctx.ahead is not None:  # this rank's batches for the next steps (absent: on-policy checkpoint)
            ctx.ahead.load_state_dict(load_ahead(resume, ctx.rank))
        if store is not None:
            store.load(resume / "hard_examples")
            store.commit()
        if ctx.is_writer:
            print(f"[resume] from {resume} at step {start}", flush=True)
    _start_rollout(ctx, version=start)
    install_stop_handler(ctx)

    def on_checkpoint(step: int) -> None:
        save_checkpoint(root, step, ctx.state, {"sampler": sampler.state_dict(), "rng": rng_state(),
                                                "completions": ctx.completions},
                        store=store, keep_last=cfg.checkpoint.keep_last,
                        ahead=ctx.ahead.state_dict() if ctx.ahead is not None else None)

    last = train_loop(ctx, sampler=sampler, store=store, start_step=start, on_checkpoint=on_checkpoint,
                      evaluate=lambda s: evaluate(ctx, s))
    out = ctx.run_dir / FINAL_MODEL
    if last >= cfg.train.steps or ctx.budget_spent:
        save_model_weights(out, ctx.state.model)
        if cfg.eval.max_problems:
            evaluate(ctx, last)
    _finish(ctx)
    return out


def run_eval(cfg: MemlConfig, checkpoint: Optional[str]) -> dict[str, float]:
    """Greedy accuracy (and pass@k) per expert of a model (model.megatron_path / --checkpoint)."""
    from megatron_meml.evaluate import evaluate
    from megatron_meml.run import setup_run

    if checkpoint:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, megatron_path=checkpoint))
    ctx = setup_run(cfg, "eval")
    _start_rollout(ctx)
    metrics = evaluate(ctx, 0)
    _finish(ctx)
    return metrics
