"""RIEL (stage 2): one step top to bottom, and the outer training loop."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch

from megatron_meml.algo.advantages import advantage_metrics, compute_advantages
from megatron_meml.algo.dynamic_sampling import DynamicBatch, collect
from megatron_meml.algo.mutual import select_pairs
from megatron_meml.batching import (grpo_rows, mutual_weight, pair_rows, sft_rows, to_train_batch,
                                    zero_advantage_share)
from megatron_meml.rewards.score import score
from megatron_meml.rewards.shaping import overlong_penalty
from megatron_meml.rollout.ahead import AheadBatch
from megatron_meml.rollout.backend import SamplingSpec
from megatron_meml.run import RunContext, stable_seed
from megatron_meml.samples import riel_samples
from megatron_meml.types import ExpertGroup


def riel_step(ctx: RunContext, step: int, sampler: Any, store: Any) -> dict[str, float]:
    """Sample -> rollout -> reward (-> refill, dynamic sampling) -> advantages -> mutual pairs -> hard examples ->
    train -> weight sync. Asynchronous (rollout.max_staleness > 0): the step's batch was generated ahead, and the
    batch of a later step generates while this one trains."""
    cfg, timers, experts, algo = ctx.cfg, ctx.timers, ctx.experts, ctx.cfg.algo
    n = cfg.train.problems_per_step
    first, gen_s = rollout_groups(ctx, step, sampler, n)
    if algo.dynamic_sampling:
        def refill(j: int) -> list[ExpertGroup]:
            nonlocal gen_s
            more, seconds = generate_groups(ctx, step, sampler, n, j)
            gen_s += seconds
            return more

        dyn = collect(first, refill, num_experts=len(experts), wanted=n,
                      on_exhausted=algo.dynamic_sampling_on_exhausted,
                      max_gen_batches=algo.dynamic_sampling_max_gen_batches)
    else:
        dyn = DynamicBatch(kept=first, generated=first)
    groups, every = dyn.kept, dyn.generated  # GRPO rows from the kept; pairs, hard examples, metrics see every group
    if ctx.ahead is not None:
        submit_ahead(ctx, step, sampler, n)  # generates while this step trains
    else:
        ctx.rollout.sleep()  # the engine's GPU memory goes to the train phase until the weight sync wakes it
    with timers("advantages"):
        rewards_t, shaping = shaped_rewards(groups, cfg)
        qidx = torch.tensor([i // len(experts) for i in range(len(groups))])
        adv = compute_advantages(rewards_t, algo, question_index=qidx) if groups else rewards_t
        # Under the clipped loss without reference KL a row at advantage exactly 0 has loss and gradient 0: it
        # stays out of the batch and only its share of the normaliser is kept (the same step, less compute).
        skip_zero = algo.skip_zero_advantage and algo.policy_loss == "clipped" and algo.kl_coef == 0
        rows = grpo_rows(groups, adv, positive_only=algo.policy_loss == "paper_pg", skip_zero=skip_zero)
        pg_extra = zero_advantage_share(groups, adv, algo.aggregation) if skip_zero else 0.0
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
        batch = to_train_batch(rows, ctx.pad_id, max_len=ctx.arch.max_position_embeddings, pg_norm_extra=pg_extra)
        train_metrics = ctx.trainer.train_step(batch)
    metrics = staleness_metrics(every, ctx.rollout.version, train_metrics, collect_ahead(ctx),
                                asynchronous=ctx.ahead is not None)
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


def generate_groups(ctx: RunContext, step: int, sampler: Any, n: int, batch: int) -> tuple[list[ExpertGroup], float]:
    """(the next ``n`` problems x K experts x G samples, scored; seconds spent generating). ``batch`` > 0: a
    dynamic-sampling refill of the same step, with its own sampling seed."""
    expanded, spec = draw(ctx, step, sampler, n, batch)
    with ctx.timers("rollout"):
        t0 = time.perf_counter()
        completions = ctx.rollout.generate([ids for _, _, ids in expanded], spec)
        gen_s = time.perf_counter() - t0
    return score_groups(ctx, expanded, completions), gen_s


def draw(ctx: RunContext, step: int, sampler: Any, n: int, batch: int) -> tuple[list[Any], SamplingSpec]:
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


def rollout_groups(ctx: RunContext, step: int, sampler: Any, n: int) -> tuple[list[ExpertGroup], float]:
    """The step's batch: generated now (on-policy, and a run's first asynchronous step) or generated ahead."""
    ahead = ctx.ahead.take(step) if ctx.ahead is not None else None
    if ahead is None:
        return generate_groups(ctx, step, sampler, n, 0)
    return ahead.groups, ahead.seconds


def submit_ahead(ctx: RunContext, step: int, sampler: Any, n: int) -> None:
    """Asynchronous rollouts: draw the batches of steps up to ``step`` + max_staleness; the last one generates
    in the background while this step trains (``collect_ahead`` ends it)."""
    for s in ctx.ahead.missing(step, ctx.cfg.train.steps):
        collect_ahead(ctx)  # one generation at a time: only a run's first step has more than one to draw
        expanded, spec = draw(ctx, s, sampler, n, 0)
        ctx.rollout.submit([ids for _, _, ids in expanded], spec, overlap=True)
        ctx.ahead.in_flight = AheadBatch(step=s, expanded=expanded)


def collect_ahead(ctx: RunContext) -> dict[str, float]:
    """Wait for the batch in flight and score it; metrics: the generation seconds hidden behind the train phase."""
    batch = ctx.ahead.in_flight if ctx.ahead is not None else None
    if batch is None:
        return {}
    t0 = time.perf_counter()
    completions, batch.seconds = ctx.rollout.collect()
    waited = time.perf_counter() - t0
    ctx.ahead.in_flight = None
    batch.groups = score_groups(ctx, batch.expanded, completions)
    ctx.ahead.add(batch)
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


def train_loop(ctx: RunContext, *, sampler: Any, store: Any, start_step: int,
               on_checkpoint: Any, evaluate: Optional[Any] = None) -> int:
    """Steps ``start_step+1 .. train.steps`` (fewer when train.rollout_budget is spent first); checkpoints on
    cadence, at the end and when asked to stop. Returns the last completed step."""
    from megatron_meml.metrics import memory_metrics, reduce_across_ranks
    from megatron_meml.run import stop_agreed

    cfg = ctx.cfg
    step = start_step
    while step < cfg.train.steps and not ctx.budget_spent:  # a resume after the budget was spent runs nothing
        step += 1
        t0 = time.perf_counter()
        metrics = riel_step(ctx, step, sampler, store)
        metrics.update(ctx.timers.pop())
        metrics["timing/step"] = time.perf_counter() - t0
        metrics.update(memory_metrics())
        metrics = reduce_across_ranks(metrics)
        ctx.completions += int(metrics["rollout/num_samples"])  # summed over ranks: the same on every rank
        metrics["rollout/completions_total"] = float(ctx.completions)
        ctx.logger.log(step, metrics, stage="train")
        ctx.logger.progress(step, cfg.train.steps, metrics, stage="train")
        stop = stop_agreed(ctx)
        done = step == cfg.train.steps or ctx.budget_spent
        if stop or done or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
            on_checkpoint(step)
        if ctx.budget_spent and ctx.is_writer:
            print(f"[train] rollout budget spent: {ctx.completions} completions >= train.rollout_budget="
                  f"{cfg.train.rollout_budget} after step {step}", flush=True)
        if evaluate is not None and cfg.eval.every and step % cfg.eval.every == 0 and not done:
            evaluate(step)
        if stop or ctx.budget_spent:
            break
    return step

