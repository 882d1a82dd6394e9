"""Stage 2, RIEL (reinforced inter-expert learning): one step top to bottom, and the stage around it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_meml.algo.advantages import advantage_metrics, compute_advantages
from megatron_meml.algo.dynamic_sampling import DynamicBatch, collect
from megatron_meml.algo.mutual import select_pairs
from megatron_meml.config import MemlConfig
from megatron_meml.data.sampler import ProblemSampler
from megatron_meml.hard_examples.store import HardExampleStore
from megatron_meml.reporting.metrics import memory_metrics, reduce_across_ranks
from megatron_meml.reporting.samples import riel_samples
from megatron_meml.rewards.score import score
from megatron_meml.rewards.shaping import overlong_penalty
from megatron_meml.rollout.ahead import AheadBatch, RolloutsAhead
from megatron_meml.rollout.backend import SamplingSpec
from megatron_meml.seeding import stable_seed
from megatron_meml.stages.batching import (grpo_rows, mutual_weight, pair_rows, policy_norm_shares, sft_rows,
                                           to_train_batch)
from megatron_meml.stages.context import RunContext, close_run, setup_run
from megatron_meml.stages.evaluate import evaluate
from megatron_meml.stages.loop import resume_point, run_steps
from megatron_meml.training.checkpoint import (load_ahead, load_checkpoint, rng_state, save_checkpoint,
                                               save_model_weights, set_rng_state)
from megatron_meml.types import ExpertGroup


@dataclass
class RielState:
    """What RIEL carries from step to step besides the model (all of it in checkpoints)."""

    sampler: ProblemSampler
    store: Optional[HardExampleStore]
    """The hard-example store (None: hard_examples.enabled false)."""
    ahead: Optional[RolloutsAhead] = None
    """The batches generated for the next steps (rollout.max_staleness > 0)."""
    completions: int = 0
    """Completions generated so far, all ranks (train.rollout_budget)."""
    budget: int = 0
    """train.rollout_budget (0: none)."""

    @property
    def budget_spent(self) -> bool:
        return self.budget > 0 and self.completions >= self.budget


def riel_step(ctx: RunContext, rs: RielState, step: int) -> dict[str, float]:
    """Sample -> rollout -> reward (-> refill, dynamic sampling) -> advantages -> mutual pairs -> hard examples ->
    train -> weight sync. Asynchronous (rollout.max_staleness > 0): the step's batch was generated ahead, and the
    batch of a later step generates while this one trains."""
    cfg, timers, experts, algo, store = ctx.cfg, ctx.timers, ctx.experts, ctx.cfg.algo, rs.store
    n = cfg.train.problems_per_step
    first, gen_s = rollout_groups(ctx, rs, step, n)
    if algo.dynamic_sampling:
        def refill(j: int) -> list[ExpertGroup]:
            nonlocal gen_s
            more, seconds = generate_groups(ctx, rs.sampler, step, n, j)
            gen_s += seconds
            return more

        dyn = collect(first, refill, num_experts=len(experts), wanted=n,
                      on_exhausted=algo.dynamic_sampling_on_exhausted,
                      max_gen_batches=algo.dynamic_sampling_max_gen_batches)
    else:
        dyn = DynamicBatch(kept=first, generated=first)
    groups, every = dyn.kept, dyn.generated  # GRPO rows from the kept; pairs, hard examples, metrics see every group
    if rs.ahead is not None:
        submit_ahead(ctx, rs, step, n)  # generates while this step trains
    else:
        ctx.rollout.sleep()  # the engine's GPU memory goes to the train phase until the weight sync wakes it
    with timers("advantages"):
        rewards_t, shaping = shaped_rewards(groups, cfg)
        qidx = torch.tensor([i // len(experts) for i in range(len(groups))])
        adv = compute_advantages(rewards_t, algo, question_index=qidx) if groups else rewards_t
        # Under the clipped loss without reference KL a row at advantage exactly 0 has loss and gradient 0: it
        # stays out of the batch and only its share of the normaliser is kept (the same step, less compute); so do
        # the rows at A <= 0 under paper_pg with pg_normaliser=all.
        skip_zero = algo.skip_zero_advantage and algo.policy_loss == "clipped" and algo.kl_coef == 0
        rows = grpo_rows(groups, adv, positive_only=algo.policy_loss == "paper_pg", skip_zero=skip_zero)
        pg_extra, pg_fallback = policy_norm_shares(groups, every, adv, algo, skip_zero=skip_zero)
    with timers("mutual"):
        pairs, weight = [], mutual_weight(step, algo.lambda_kl_warmup_steps)
        if algo.mutual_learning and len(experts) > 1:
            pairs = select_pairs(every, min_gap=algo.mutual_min_gap)
            rows += pair_rows(pairs, experts, weight=weight)
    hard_metrics: dict[str, float] = {}
    with timers("hard_examples"):
        if store is not None:
            hard_metrics.update(store.update(every, step))
            if store.sft_due:
                rows += sft_rows(hard_sft_examples(ctx, store.sft_batch(ctx.dp_rank, ctx.dp_size)))
                hard_metrics.update(store.record_replay())
            store.commit()
            hard_metrics.update(store.metrics())
    with timers("train"):
        batch = to_train_batch(rows, ctx.pad_id, max_len=ctx.arch.max_position_embeddings, pg_norm_extra=pg_extra,
                               pg_norm_fallback=pg_fallback)
        train_metrics = ctx.trainer.train_step(batch)
    metrics = staleness_metrics(every, ctx.rollout.version, train_metrics, collect_ahead(ctx, rs.ahead),
                                asynchronous=rs.ahead is not None)
    with timers("weight_sync"):
        sync_metrics = ctx.rollout.sync()
    metrics.update(rollout_metrics(every, [c for g in every for c in g.completions], gen_s, experts.ids))
    if groups:
        metrics.update(advantage_metrics(rewards_t, adv))
    metrics.update(shaping)
    if algo.dynamic_sampling:
        metrics.update(dyn.metrics())
    for part in (train_metrics, hard_metrics, sync_metrics):
        metrics.update(part)
    with timers("samples"):
        metrics.update(riel_samples(ctx, step, every))
    metrics["rollout/mutual_pairs"] = float(len(pairs))
    metrics["train/mutual_lambda"] = algo.lambda_kl * weight
    metrics["rollout/train_rows"] = float(len(rows))
    return metrics


def generate_groups(ctx: RunContext, sampler: ProblemSampler, step: int, n: int,
                    batch: int) -> tuple[list[ExpertGroup], float]:
    """(the next ``n`` problems x K experts x G samples, scored; seconds spent generating). ``batch`` > 0: a
    dynamic-sampling refill of the same step, with its own sampling seed."""
    expanded, spec = draw(ctx, sampler, step, n, batch)
    with ctx.timers("rollout"):
        t0 = time.perf_counter()
        completions = ctx.rollout.generate([ids for _, _, ids in expanded], spec)
        gen_s = time.perf_counter() - t0
    return score_groups(ctx, expanded, completions), gen_s


def draw(ctx: RunContext, sampler: ProblemSampler, step: int, n: int, batch: int) -> tuple[list[Any], SamplingSpec]:
    """The next ``n`` problems x K expert prompts, and how step ``step`` (refill ``batch``) samples them."""
    cfg = ctx.cfg
    with ctx.timers("sample"):
        expanded = ctx.experts.expand(sampler.next_batch(n))
    seed = cfg.rollout.seed if cfg.rollout.seed is not None else stable_seed(cfg.seed, step)
    spec = SamplingSpec(n=cfg.rollout.samples_per_expert, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_new_tokens,
                        seed=stable_seed(seed, batch) if batch else seed)
    return expanded, spec


def score_groups(ctx: RunContext, expanded: list[Any], completions: list[Any]) -> list[ExpertGroup]:
    """Verifier rewards per (problem, expert) group of G completions."""
    cfg, g = ctx.cfg, ctx.cfg.rollout.samples_per_expert
    with ctx.timers("reward"):
        groups = []
        for i, (problem, e, _) in enumerate(expanded):
            outs = completions[i * g:(i + 1) * g]
            rewards = [score(problem, c.text, cfg.experts.answer_format, cfg.reward).reward for c in outs]
            groups.append(ExpertGroup(problem=problem, expert=e, completions=outs, rewards=rewards))
    return groups


def rollout_groups(ctx: RunContext, rs: RielState, step: int, n: int) -> tuple[list[ExpertGroup], float]:
    """The step's batch: generated now (on-policy, and a run's first asynchronous step) or generated ahead."""
    ahead = rs.ahead.take(step) if rs.ahead is not None else None
    if ahead is None:
        return generate_groups(ctx, rs.sampler, step, n, 0)
    return ahead.groups, ahead.seconds


def submit_ahead(ctx: RunContext, rs: RielState, step: int, n: int) -> None:
    """Asynchronous rollouts: draw the batches of steps up to ``step`` + max_staleness; the last one generates
    in the background while this step trains (``collect_ahead`` ends it)."""
    for s in rs.ahead.missing(step, ctx.cfg.train.steps):
        collect_ahead(ctx, rs.ahead)  # one generation at a time: only a run's first step has more than one to draw
        expanded, spec = draw(ctx, rs.sampler, s, n, 0)
        ctx.rollout.submit([ids for _, _, ids in expanded], spec, overlap=True)
        rs.ahead.in_flight = AheadBatch(step=s, expanded=expanded)


def collect_ahead(ctx: RunContext, ahead: Optional[RolloutsAhead]) -> dict[str, float]:
    """Wait for the batch in flight and score it; metrics: the generation seconds hidden behind the train phase."""
    batch = ahead.in_flight if ahead is not None else None
    if batch is None:
        return {}
    t0 = time.perf_counter()
    completions, batch.seconds = ctx.rollout.collect()
    waited = time.perf_counter() - t0
    ahead.in_flight = None
    batch.groups = score_groups(ctx, batch.expanded, completions)
    ahead.add(batch)
    return {"timing/rollout_wait": waited, "rollout/overlap_seconds": max(batch.seconds - waited, 0.0)}


def shaped_rewards(groups: list[ExpertGroup], cfg: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """[groups, G] rewards for the advantages: the verifier's plus the soft overlong penalty (when set), and the
    penalty's metric."""
    r = torch.tensor([grp.rewards for grp in groups], dtype=torch.float32).reshape(len(groups),
                                                                                 cfg.rollout.samples_per_expert)
    if cfg.reward.overlong_buffer <= 0 or not groups:
        return r, {}
    pen = torch.tensor([[overlong_penalty(len(c.token_ids), cfg.rollout.max_new_tokens, cfg.reward.overlong_buffer,
                                          cfg.reward.overlong_penalty) for c in grp.completions] for grp in groups])
    return r + pen, {"reward/overlong_penalty": float(pen.mean()),
                     "reward/overlong_frac": float((pen < 0).float().mean())}


def hard_sft_examples(ctx: RunContext, examples: list[Any]) -> list[Any]:
    """SFT rows for drawn hard examples: the expert's own gold style (hard_examples.target=expert_style, when the
    problem is in this run's data and has one) or the problem's solution."""
    by_id, own_style = ctx.problems_by_id, ctx.cfg.hard_examples.target == "expert_style"
    out = []
    for e in examples:
        problem = by_id.get(e.problem_id) or e.to_problem()
        target = ctx.experts.gold_response(e.expert, problem, own_style=own_style)
        out.append(ctx.experts.sft_example(e.expert, problem, target))
    return out


def staleness_metrics(groups: list[ExpertGroup], version: int, train_metrics: dict[str, float],
                      ahead_metrics: dict[str, float], *, asynchronous: bool) -> dict[str, float]:
    """rollout/staleness: mean steps between the weights that sampled a completion and those that trained on it
    (``version``); the train/rollout mismatch under that staleness when the whole step shares one."""
    gaps = [version - c.policy_version for g in groups for c in g.completions]
    if not gaps:
        return dict(ahead_metrics)
    m = {"rollout/staleness": sum(gaps) / len(gaps), "rollout/staleness_max": float(max(gaps)), **ahead_metrics}
    if asynchronous and min(gaps) == max(gaps) and "train/mismatch_abs" in train_metrics:
        m[f"train/mismatch_abs_staleness{gaps[0]}"] = train_metrics["train/mismatch_abs"]
    return m


def rollout_metrics(groups: list[ExpertGroup], completions: list[Any], gen_seconds: float,
                    expert_ids: list[str]) -> dict[str, float]:
    tokens = sum(len(c.token_ids) for c in completions)
    m = {"rollout/num_samples": float(len(completions)), "rollout/tokens": float(tokens),
         "rollout/throughput": tokens / max(gen_seconds, 1e-9),
         "rollout/mean_length": tokens / max(len(completions), 1),
         "rollout/truncated_frac": sum(c.finish_reason == "length" for c in completions) / max(len(completions), 1),
         "reward/mean": sum(sum(g.rewards) for g in groups) / max(sum(len(g.rewards) for g in groups), 1)}
    for e, eid in enumerate(expert_ids):
        mine = [r for grp in groups if grp.expert == e for r in grp.rewards]
        if mine:
            m[f"expert/{eid}/reward_mean"] = sum(mine) / len(mine)
            m[f"expert/{eid}/all_wrong_frac"] = sum(1 for grp in groups if grp.expert == e
                                                    and max(grp.rewards) <= 0) / max(
                sum(1 for grp in groups if grp.expert == e), 1)
    return m


def run_train(cfg: MemlConfig) -> Path:
    """Collective. Stage 2: train.steps RIEL steps (fewer once train.rollout_budget is spent), then the final model
    and its evaluation; returns the model directory."""
    resume = resume_point(cfg)
    ctx = setup_run(cfg, "train", resume_step=resume.step if resume.path else None)
    store = None
    if cfg.hard_examples.enabled:
        store = HardExampleStore(cfg.hard_examples, ctx.paths.hard_examples, seed=cfg.seed,
                                 group=ps.get_data_parallel_group() if dist.get_world_size() > 1 else None)
    rs = RielState(sampler=ProblemSampler(ctx.train_problems, seed=cfg.seed, dp_rank=ctx.dp_rank,
                                          dp_size=ctx.dp_size),
                   store=store, ahead=RolloutsAhead(cfg.rollout.max_staleness) if cfg.rollout.max_staleness else None,
                   budget=cfg.train.rollout_budget)
    if resume.path:
        restore(ctx, rs, resume.path, resume.step)
    ctx = ctx.with_rollout(version=resume.step)
    if cfg.eval.max_problems and cfg.eval.at_start and resume.path is None:
        evaluate(ctx, 0)
    ctx.stop.install()

    def step(s: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = riel_step(ctx, rs, s)
        metrics.update(ctx.timers.pop())
        metrics["timing/step"] = time.perf_counter() - t0
        metrics.update(memory_metrics())
        metrics = reduce_across_ranks(metrics)
        rs.completions += int(metrics["rollout/num_samples"])  # summed over ranks: the same on every rank
        metrics["rollout/completions_total"] = float(rs.completions)
        return metrics

    def checkpoint(s: int) -> None:
        save_checkpoint(ctx.paths.checkpoints, s, ctx.state,
                        {"sampler": rs.sampler.state_dict(), "rng": rng_state(), "completions": rs.completions},
                        store=rs.store, keep_last=cfg.checkpoint.keep_last,
                        ahead=rs.ahead.state_dict() if rs.ahead is not None else None)

    def after_step(s: int, done: bool) -> None:
        if rs.budget_spent and ctx.is_writer:
            print(f"[train] rollout budget spent: {rs.completions} completions >= train.rollout_budget="
                  f"{cfg.train.rollout_budget} after step {s}", flush=True)
        if cfg.eval.every and s % cfg.eval.every == 0 and not done:
            evaluate(ctx, s)

    last, _ = run_steps(ctx, stage="train", start=resume.step, total=cfg.train.steps, step=step,
                        checkpoint=checkpoint, checkpoint_at_end=cfg.checkpoint.save_every > 0, finished=lambda: rs.budget_spent,
                        after_step=after_step)
    if last >= cfg.train.steps or rs.budget_spent:
        save_model_weights(ctx.paths.final_model, ctx.state.model)
        if cfg.eval.max_problems:
            evaluate(ctx, last)
    close_run(ctx)
    return ctx.paths.final_model


def restore(ctx: RunContext, rs: RielState, path: Path, step: int) -> None:
    """Collective: the model, optimizer, sampler, RNG, budget, hard-example store and rollouts ahead of a
    checkpoint."""
    saved = load_checkpoint(path, ctx.state, load_optimizer=ctx.cfg.checkpoint.load_optimizer)
    rs.sampler.load_state_dict(saved["sampler"])
    set_rng_state(saved["rng"])
    rs.completions = int(saved.get("completions", 0))  # checkpoints older than train.rollout_budget lack it
    if rs.ahead is not None:  # this rank's batches for the next steps (absent: on-policy checkpoint)
        rs.ahead.load_state_dict(load_ahead(path, ctx.rank))
    if rs.store is not None:
        rs.store.load(path / "hard_examples")
        rs.store.commit()
    if ctx.is_writer:
        print(f"[resume] from {path} at step {step}", flush=True)
