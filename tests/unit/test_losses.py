"""Each loss against hand-worked numbers written out below, plus micro-batch exactness of normalisers."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_meml.algo.losses import (aggregate, clipped_pg_loss, kl_estimate, kl_to_reference_loss,
                                       local_normaliser, mutual_kl_positions, mutual_pair_weights,
                                       mutual_teacher_nll_loss, paper_pg_loss,
                                       sequence_logprob, sequence_mutual_kl_loss, sft_nll_loss, tis_weights,
                                       token_mutual_kl_loss)

LOGP = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def approx(x):
    return pytest.approx(x, abs=1e-6)


@pytest.mark.parametrize("aggregation,normaliser,expected", [
    ("token_mean", 5, 3.0 / 5),            # row 0: 0.5 * (1 + 2 + 3) = 3; row 1: A < 0 -> 0
    ("seq_mean_token_mean", 2, 1.0 / 2),   # row means 1.0 and 0
    ("seq_mean_token_sum", 2, 3.0 / 2),
])
def test_paper_pg(aggregation, normaliser, expected):
    logp = LOGP.clone().requires_grad_()
    loss, m = paper_pg_loss(logp, torch.tensor([0.5, -1.0]), MASK, normaliser, aggregation=aggregation)
    assert loss.item() == approx(expected) and m["train/pg_loss"].item() == approx(expected)
    loss.backward()
    assert torch.equal(logp.grad[1], torch.zeros(3))  # negative advantage: no gradient
    assert logp.grad[0, 0].item() < 0


def test_paper_pg_with_is_weights_and_token_advantages():
    adv = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 1.0, 5.0]])
    w = torch.tensor([[0.5, 1.0, 1.0], [1.0, 2.0, 1.0]])
    # tokens: 1*1*.5 + 2*2*1 + 0 + 0 + 1*1*2 (+ masked) = 6.5
    loss, _ = paper_pg_loss(LOGP, adv, MASK, 5.0, is_weights=w)
    assert loss.item() == approx(6.5 / 5)


# ratios 0.5, 1, 1.5, 4 with A = +1 (row 0) and A = -1 (row 1); clip_low 0.2, clip_high 0.28, dual c = 3
RATIOS = torch.tensor([[0.5, 1.0, 1.5, 4.0], [0.5, 1.0, 1.5, 4.0]])
ADV = torch.tensor([1.0, -1.0])


def test_clipped_hand_worked_with_clip_higher_and_dual_clip():
    logp = RATIOS.log().requires_grad_()
    mask = torch.ones(2, 4)
    loss, m = clipped_pg_loss(logp, torch.zeros(2, 4), ADV, mask, 8, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # row 0: max(-r, -clip(r)) = -0.5, -1, -1.28, -1.28; row 1: max(r, clip(r)) = 0.8, 1, 1.5, 4 -> dual cap 3
    assert loss.item() == approx((-0.5 - 1 - 1.28 - 1.28 + 0.8 + 1 + 1.5 + 3.0) / 8)
    assert m["train/clip_frac"].item() == approx(3 / 8)
    assert m["train/dual_clip_frac"].item() == approx(1 / 8)
    assert m["train/ppo_kl"].item() == approx(-2 * (math.log(0.5) + math.log(1.5) + math.log(4.0)) / 8)
    loss.backward()
    # d(-A r)/dlogp = -A r on unclipped tokens; clipped and dual-clipped tokens get none
    expected = torch.tensor([[-0.5, -1.0, 0.0, 0.0], [0.0, 1.0, 1.5, 0.0]]) / 8
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_clipped_metrics_over_the_rows_present():
    """Rows left out at advantage 0 count in the loss's normaliser (12 tokens: 8 here, 4 left out) but not in
    the clip metrics' (8)."""
    mask = torch.ones(2, 4)
    loss, m = clipped_pg_loss(RATIOS.log(), torch.zeros(2, 4), ADV, mask, 12, clip_low=0.2, clip_high=0.28,
                              dual_clip=3.0, metric_normaliser=8)
    assert loss.item() == approx((-0.5 - 1 - 1.28 - 1.28 + 0.8 + 1 + 1.5 + 3.0) / 12)
    assert m["train/pg_loss"].item() == approx(loss.item())
    assert m["train/clip_frac"].item() == approx(3 / 8)
    assert m["train/dual_clip_frac"].item() == approx(1 / 8)


def test_clipped_without_dual_clip_and_seq_aggregation():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    loss, m = clipped_pg_loss(RATIOS.log(), torch.zeros(2, 4), ADV, mask, 2, clip_low=0.2, clip_high=0.28,
                              aggregation="seq_mean_token_mean")
    # row 0 mean (-0.5 - 1) / 2 = -0.75; row 1 mean (0.8 + 1 + 1.5 + 4) / 4 = 1.825
    assert loss.item() == approx((-0.75 + 1.825) / 2)
    assert m["train/clip_frac"].item() == approx((0 / 2 + 1 / 4) / 2)
    assert m["train/dual_clip_frac"].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_pg_loss(RATIOS.log(), torch.zeros(2, 4), ADV, mask, 2, clip_low=0.2, clip_high=0.2, dual_clip=1.0)


def test_kl_estimators_hand_worked():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0]]))
    loss, m = kl_to_reference_loss(logp, ref, torch.ones(1, 2), 2, kind="k3")
    assert loss.item() == approx((math.exp(-0.5) - 0.5 + math.e - 2.0) / 2) == m["train/kl_ref"].item()
    loss1, _ = kl_to_reference_loss(logp, ref, torch.ones(1, 2), 2, kind="k1")
    assert loss1.item() == approx(-0.25)
    with pytest.raises(ValueError, match="kl kind"):
        kl_estimate(logp, ref, "k2")


def test_k3_gradient_pulls_towards_reference():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = kl_to_reference_loss(logp, torch.tensor([[-2.0]]), torch.ones(1, 1), 1)
    loss.backward()  # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp) = 1 - e^-1
    assert logp.grad.item() == approx(1 - math.exp(-1.0))


def test_tis_weights_and_mismatch_metrics():
    old = torch.tensor([[-1.0, -1.0, -2.0, 9.0]])
    rollout = torch.tensor([[-1.5, -0.2, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, m = tis_weights(old, rollout, mask, 3, cap=1.5)
    assert torch.allclose(w[0, :3], torch.tensor([1.5, math.exp(-0.8), 1.0]))
    assert not w.requires_grad
    assert m["train/mismatch_abs"].item() == approx((0.5 + 0.8 + 0.0) / 3)
    k3 = (math.exp(0.5) - 1.5) + (math.exp(-0.8) - 1 + 0.8)
    assert m["train/mismatch_k3"].item() == approx(k3 / 3)
    assert m["train/tis_clip_frac"].item() == approx(1 / 3)
    w_off, m_off = tis_weights(old, rollout, mask, 3, cap=None)
    assert torch.equal(w_off, torch.ones(1, 4)) and m_off["train/mismatch_abs"].item() == approx(1.3 / 3)


def test_sequence_mutual_kl_hand_worked():
    student = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, -0.5, -1.0]], requires_grad=True)
    smask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    teacher = torch.tensor([-1.5, -2.5], requires_grad=True)
    loss, m = sequence_mutual_kl_loss(student, smask, teacher, 2)
    # pair 0: -1.5 - (-3) = 1.5; pair 1: -2.5 - (-2) = -0.5
    assert loss.item() == approx(0.5) and m["train/mutual_kl"].item() == approx(0.5)
    loss.backward()
    assert torch.equal(student.grad, -smask / 2)  # raises log pi(O+ | P-) on every scored token
    assert teacher.grad is None                    # teacher branch detached
    assert torch.equal(sequence_logprob(student.detach(), smask), torch.tensor([-3.0, -2.0]))


def test_token_mutual_kl_hand_worked():
    # row 0 = student (P-) scores position 1, row 1 = teacher (P+) scores position 0
    logits = torch.zeros(2, 2, 2)
    logits[1, 0] = torch.tensor([math.log(3.0), 0.0])  # teacher p = [.75, .25]; student p = [.5, .5]
    logits.requires_grad_()
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    s_pos, t_pos = mutual_kl_positions(mask, torch.tensor([0]), torch.tensor([1]))
    assert s_pos.tolist() == [1] and t_pos.tolist() == [2]
    loss, m = token_mutual_kl_loss(logits, s_pos, t_pos, 1)
    assert loss.item() == approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5)) == m["train/mutual_kl"].item()
    loss.backward()
    assert torch.allclose(logits.grad[0, 1], torch.tensor([-0.25, 0.25]))  # p_s - p_t
    assert logits.grad[1].abs().sum() == 0


def test_mutual_pair_weights_hand_worked():
    student = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, -0.5, -1.0]])
    smask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    base = torch.tensor([0.5, 1.0])
    w, m = mutual_pair_weights(student, smask, base)  # the paper: scheduled weight only
    assert torch.equal(w, base) and m["train/mutual_active_pairs"].item() == 2
    w, _ = mutual_pair_weights(student, smask, base, normalise="token")  # divided by |O+| = 2 and 3
    assert torch.allclose(w, torch.tensor([0.25, 1.0 / 3]))
    # mean per-token log-probs under P-: -1.5 and -2/3; a -1.0 floor keeps only pair 1
    w, m = mutual_pair_weights(student, smask, base, min_student_logprob=-1.0)
    assert torch.equal(w, torch.tensor([0.0, 1.0])) and m["train/mutual_active_pairs"].item() == 1
    with pytest.raises(ValueError, match="base must be \\[2\\]"):
        mutual_pair_weights(student, smask, torch.ones(3))


def test_weighted_mutual_kl_hand_worked():
    student = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, -0.5, -1.0]], requires_grad=True)
    smask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    teacher = torch.tensor([-1.5, -2.5])
    loss, _ = sequence_mutual_kl_loss(student, smask, teacher, 2, pair_weights=torch.tensor([0.0, 2.0]))
    assert loss.item() == approx(2.0 * -0.5 / 2)  # pair 0 gated out, pair 1 doubled
    loss.backward()
    assert torch.equal(student.grad, torch.tensor([[0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]))
    # token form: weights per position scale each position's KL
    logits = torch.zeros(2, 2, 2)
    logits[1, 0] = torch.tensor([math.log(3.0), 0.0])
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    s_pos, t_pos = mutual_kl_positions(mask, torch.tensor([0]), torch.tensor([1]))
    full, _ = token_mutual_kl_loss(logits, s_pos, t_pos, 1)
    half, _ = token_mutual_kl_loss(logits, s_pos, t_pos, 1, position_weights=torch.tensor([0.5]))
    assert half.item() == approx(0.5 * full.item())


def test_mutual_teacher_nll_hand_worked():
    teacher = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, -0.5, -1.0]], requires_grad=True)
    tmask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, m = mutual_teacher_nll_loss(teacher, tmask, 2)
    assert loss.item() == approx((1.5 + 2.0 / 3) / 2) and m["train/mutual_teacher_nll"].item() == loss.item()
    loss.backward()
    assert torch.allclose(teacher.grad, torch.tensor([[-0.25, -0.25, 0.0], [-1 / 6, -1 / 6, -1 / 6]]))


def test_mutual_positions_mismatch_names_the_pair():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="pair 0: student row 0 scores 2 tokens but teacher row 1 scores 1"):
        mutual_kl_positions(mask, torch.tensor([0]), torch.tensor([1]))


@pytest.mark.parametrize("aggregation,normaliser,expected", [
    ("token_mean", 3, 8.0 / 3), ("seq_mean_token_mean", 2, (2.0 + 4.0) / 2), ("seq_mean_token_sum", 2, 8.0 / 2)])
def test_sft_nll(aggregation, normaliser, expected):
    logp = torch.tensor([[-1.0, -3.0], [-4.0, 0.0]])
    loss, m = sft_nll_loss(logp, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), normaliser, aggregation=aggregation)
    assert loss.item() == approx(expected) and m["train/sft_nll"].item() == approx(expected)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_micro_batch_sum_equals_whole_batch(aggregation):
    torch.manual_seed(0)
    logp = torch.randn(6, 5).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(6, 5)
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[2] = 0.0  # an empty row counts for nothing
    norm = sum(local_normaliser(mask[s], aggregation) for s in (slice(0, 2), slice(2, 6)))
    kw = dict(clip_low=0.2, clip_high=0.3, dual_clip=2.0, aggregation=aggregation)
    whole, wm = clipped_pg_loss(logp, old, adv, mask, norm, **kw)
    parts = [clipped_pg_loss(logp[s], old[s], adv[s], mask[s], norm, **kw) for s in (slice(0, 2), slice(2, 6))]
    assert sum(p[0] for p in parts).item() == approx(whole.item())
    assert sum(p[1]["train/clip_frac"] for p in parts).item() == approx(wm["train/clip_frac"].item())
    g_whole = torch.autograd.grad(whole, logp)[0]
    g_parts = torch.autograd.grad(sum(p[0] for p in parts), logp)[0]
    assert torch.allclose(g_whole, g_parts, atol=1e-7)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(LOGP, MASK, 1, "sum")
    with pytest.raises(ValueError, match="normaliser"):
        sft_nll_loss(LOGP, MASK, 0)
    with pytest.raises(ValueError, match="advantages"):
        paper_pg_loss(LOGP, torch.zeros(3), MASK, 1)
    with pytest.raises(ValueError, match="old_logprobs shape"):
        clipped_pg_loss(LOGP, torch.zeros(2, 2), torch.zeros(2), MASK, 1, clip_low=0.2, clip_high=0.2)
