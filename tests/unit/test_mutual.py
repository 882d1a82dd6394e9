"""Mutual-learning pair selection, the rows a pair becomes, and lambda1's warm-up schedule."""
from __future__ import annotations

import pytest

from megatron_meml.algo.mutual import select_pairs
from megatron_meml.data import DataConfig, load_problems
from megatron_meml.experts.config import ExpertsConfig
from megatron_meml.experts.expert_set import synthetic_expert_set
from megatron_meml.stages.batching import mutual_weight, pair_rows
from megatron_meml.training.forward_step import STUDENT, TEACHER
from megatron_meml.types import Completion, ExpertGroup


def _problems(n):
    cfg = DataConfig(synthetic_levels=[1], synthetic_weights=[1.0], synthetic_size=n)
    return load_problems("synthetic", seed=0, config=cfg)


def _group(problem, expert, rewards, prompt=(1, 2)):
    outs = [Completion(prompt_ids=list(prompt), token_ids=[10 + expert, 20 + i], text=f"e{expert}s{i}",
                       logprobs=[-0.5, -0.5], finish_reason="stop") for i in range(len(rewards))]
    return ExpertGroup(problem=problem, expert=expert, completions=outs, rewards=list(rewards))


def test_select_pairs_best_vs_worst_first_correct_response():
    p, q, r = _problems(3)
    groups = [_group(p, 0, [0, 0, 0]), _group(p, 1, [0, 1, 1]), _group(p, 2, [1, 0, 0]),   # E1 best, E0 worst
              _group(q, 0, [1, 1, 0]), _group(q, 1, [1, 1, 0]), _group(q, 2, [1, 1, 0]),   # all equal: none
              _group(r, 0, [0, 0, 0]), _group(r, 1, [0, 0, 0]), _group(r, 2, [0, 0, 0])]   # no correct O+
    pairs = select_pairs(groups)
    assert [(pr.problem.id, pr.strong, pr.weak, pr.response.text) for pr in pairs] == [(p.id, 1, 0, "e1s1")]
    assert select_pairs(groups, min_gap=0.7) == []  # gap 2/3 is not above 0.7


def test_pair_rows_carry_the_scheduled_weight():
    experts = synthetic_expert_set(ExpertsConfig(), 3)
    p = _problems(1)[0]
    pairs = select_pairs([_group(p, 0, [0, 0]), _group(p, 2, [1, 0], prompt=experts.prompt_ids(2, p))])
    student, teacher = pair_rows(pairs, experts, weight=0.25)
    assert (student.kind, teacher.kind, student.pair, teacher.pair) == (STUDENT, TEACHER, 0, 0)
    assert student.advantage == 0.25 and teacher.advantage == 0.0
    assert student.tokens[:len(experts.prompt_ids(0, p))] == experts.prompt_ids(0, p)   # P- prompt
    assert student.tokens[-2:] == teacher.tokens[-2:] == [12, 20]                        # the same O+
    assert sum(student.loss_mask) == sum(teacher.loss_mask) == 2


@pytest.mark.parametrize("step,warmup,expected", [(1, 0, 1.0), (1, 4, 0.25), (3, 4, 0.75), (4, 4, 1.0),
                                                  (9, 4, 1.0)])
def test_mutual_weight_warmup(step, warmup, expected):
    assert mutual_weight(step, warmup) == pytest.approx(expected)


@pytest.mark.parametrize("target", ["expert_style", "solution"])
def test_hard_example_sft_target(target):
    from types import SimpleNamespace

    from megatron_meml.config import load_config
    from megatron_meml.hard_examples.example import HardExample
    from megatron_meml.stages.riel import hard_sft_examples

    experts = synthetic_expert_set(ExpertsConfig(), 3)
    p = _problems(1)[0]
    cfg = load_config(None, [f"hard_examples.target={target}"])
    ctx = SimpleNamespace(cfg=cfg, experts=experts, problems_by_id={p.id: p})
    drawn = [HardExample(problem_id=p.id, expert=2, question=p.question, solution=p.solution, answer=p.answer,
                         admitted_step=1, wrong=8, group_size=8)]
    (row,) = hard_sft_examples(ctx, drawn)
    want = experts.gold_response(2, p, own_style=target == "expert_style")
    assert row.tokens == experts.sft_example(2, p, want).tokens
    assert (p.meta["solutions"]["columns"] in want) == (target == "expert_style")
