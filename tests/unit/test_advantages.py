"""Advantages against hand-worked numbers; all-equal groups give exactly 0, never NaN."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_meml.algo.advantages import (advantage_metrics, compute_advantages, drgrpo_advantages,
                                           grpo_advantages, paper_advantages, pooled_advantages)
from megatron_meml.algo.config import AlgoConfig

R = torch.tensor([[1.0, 0.0, 0.0, 0.0],   # mean 0.25
                  [1.0, 1.0, 0.0, 0.0],   # mean 0.5
                  [0.0, 0.0, 0.0, 0.0]])  # no signal


def test_paper_positive_part_of_r_minus_mean():
    expected = torch.tensor([[0.75, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(paper_advantages(R), expected)


def test_drgrpo_r_minus_mean():
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.5, 0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(drgrpo_advantages(R), expected)


def test_grpo_std_normalised_with_bessel():
    # row 0: sample std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5; row 1: sqrt(4 * 0.25 / 3) = 1/sqrt(3)
    eps = 1e-6
    adv = grpo_advantages(R, eps)
    assert torch.allclose(adv[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + eps))
    assert torch.allclose(adv[1], torch.tensor([0.5, 0.5, -0.5, -0.5]) / (1 / math.sqrt(3) + eps))
    assert torch.equal(adv[2], torch.zeros(4))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7, 1e-9])
@pytest.mark.parametrize("fn", [paper_advantages, drgrpo_advantages, grpo_advantages])
def test_all_equal_groups_exactly_zero(fn, value):
    # 0.1 * 3 / 3 != 0.1 in floating point: the exact-zero rule must not depend on the mean's rounding
    r = torch.full((2, 3), value)
    adv = fn(r)
    assert torch.equal(adv, torch.zeros(2, 3)) and not adv.isnan().any()


def test_group_of_one_is_zero_not_nan():
    adv = grpo_advantages(torch.tensor([[1.0], [0.0]]))
    assert torch.equal(adv, torch.zeros(2, 1))


def test_pooled_baseline_across_experts_of_a_question():
    # question 7: groups 0 and 2 (rewards 1,0 | 1,1) -> mean 0.75; question 3: groups 1 and 3 (all 0.5).
    r = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.5, 0.5]])
    q = torch.tensor([7, 3, 7, 3])
    expected = torch.tensor([[0.25, -0.75], [0.0, 0.0], [0.25, 0.25], [0.0, 0.0]])
    assert torch.equal(pooled_advantages(r, q), expected)


def test_pooled_expert_with_all_wrong_still_learns_from_pool():
    # per-expert baseline gives group 1 nothing; pooled with a solving expert gives it negative signal
    r = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert torch.equal(pooled_advantages(r, torch.tensor([0, 0])), torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))
    assert torch.equal(drgrpo_advantages(r), torch.zeros(2, 2))


def test_dispatch_and_errors():
    assert torch.equal(compute_advantages(R, AlgoConfig(advantage="paper")), paper_advantages(R))
    assert torch.equal(compute_advantages(R, AlgoConfig(advantage="grpo", adv_eps=0.5)), grpo_advantages(R, 0.5))
    assert torch.equal(compute_advantages(R, AlgoConfig(advantage="drgrpo")), drgrpo_advantages(R))
    q = torch.tensor([0, 0, 1])
    assert torch.equal(compute_advantages(R, AlgoConfig(advantage="pooled"), q), pooled_advantages(R, q))
    with pytest.raises(ValueError, match="question_index"):
        compute_advantages(R, AlgoConfig(advantage="pooled"))
    with pytest.raises(ValueError, match=r"\[N_groups, G\]"):
        paper_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        paper_advantages(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="algo.adv_eps"):
        AlgoConfig(adv_eps=0.0)


def test_metrics():
    m = advantage_metrics(R, paper_advantages(R))
    assert m["train/adv_zero_group_frac"].item() == pytest.approx(1 / 3)
    assert m["train/adv_pos_frac"].item() == pytest.approx(3 / 12)
