"""Chunked log-probs / entropy / token KL vs plain full-vocabulary torch (fp32, max abs diff <= 1e-5)."""
from __future__ import annotations

import pytest
import torch

from megatron_meml.algo.logprobs import (vocab_parallel_kl, vocab_parallel_logprobs,
                                         vocab_parallel_logprobs_from_hidden)

TOL = 1e-5


def ref_logprobs(logits, targets):
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def ref_kl(student, teacher):
    lt = torch.log_softmax(teacher.detach(), -1)
    return (lt.exp() * (lt - torch.log_softmax(student, -1))).sum(-1)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_hand_worked_two_tokens():
    # uniform over 4 -> log(1/4), entropy log 4; logits [0, ln 3] -> p = [1/4, 3/4].
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]]).log1p()  # [0,0,0,0], [0,ln4,0,0]
    targets = torch.tensor([2, 1])
    lp, ent = vocab_parallel_logprobs(logits, targets, with_entropy=True)
    # row 2: exp = [1, 4, 1, 1] / 7
    assert torch.allclose(lp, torch.tensor([torch.log(torch.tensor(0.25)), torch.log(torch.tensor(4 / 7))]))
    p2 = torch.tensor([1, 4, 1, 1]) / 7.0
    assert torch.allclose(ent, torch.stack([torch.log(torch.tensor(4.0)), -(p2 * p2.log()).sum()]))


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("shape", [(2, 5), (5, 2)])
def test_logits_path_matches_reference(chunk, shape):
    torch.manual_seed(0)
    v = 37
    logits = (torch.randn(*shape, v) * 3).requires_grad_()
    targets = torch.randint(0, v, shape)
    g_lp, g_ent = torch.randn(shape), torch.randn(shape)
    lp, ent = vocab_parallel_logprobs(logits, targets, chunk_size=chunk, with_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    rlp, rent = ref_logprobs(logits, targets)
    (rlp * g_lp + rent * g_ent).sum().backward()
    assert _max_diff(lp, rlp) <= TOL and _max_diff(ent, rent) <= TOL
    assert _max_diff(ours, logits.grad) <= TOL


def test_logprob_only_and_entropy_only_gradients():
    torch.manual_seed(1)
    logits = torch.randn(9, 11, requires_grad=True)
    targets = torch.randint(0, 11, (9,))
    lp, none = vocab_parallel_logprobs(logits, targets, chunk_size=4)
    assert none is None
    lp.sum().backward()
    g1 = logits.grad.clone()
    logits.grad = None
    ref_logprobs(logits, targets)[0].sum().backward()
    assert _max_diff(g1, logits.grad) <= TOL
    logits.grad = None
    _, ent = vocab_parallel_logprobs(logits, targets, chunk_size=4, with_entropy=True)
    ent.sum().backward()  # logprob output unused: its gradient arrives as None
    g2 = logits.grad.clone()
    logits.grad = None
    ref_logprobs(logits, targets)[1].sum().backward()
    assert _max_diff(g2, logits.grad) <= TOL


def test_gradient_matches_onehot_minus_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    lp, _ = vocab_parallel_logprobs(logits, torch.tensor([0]))
    lp.sum().backward()
    p = torch.softmax(logits.detach(), -1)
    assert torch.allclose(logits.grad, torch.tensor([[1.0, 0.0, 0.0]]) - p, atol=1e-7)


@pytest.mark.parametrize("chunk", [4, 5, 100])
def test_hidden_path_matches_reference(chunk):
    torch.manual_seed(2)
    n_b, n_t, h, v = 3, 7, 8, 29
    hidden = torch.randn(n_b, n_t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n_b, n_t))
    g_lp, g_ent = torch.randn(n_b, n_t), torch.randn(n_b, n_t)
    lp, ent = vocab_parallel_logprobs_from_hidden(hidden, weight, targets, chunk_size=chunk, with_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    rlp, rent = ref_logprobs(hidden @ weight.t(), targets)
    (rlp * g_lp + rent * g_ent).sum().backward()
    assert _max_diff(lp, rlp) <= TOL and _max_diff(ent, rent) <= TOL
    assert _max_diff(gh, hidden.grad) <= TOL and _max_diff(gw, weight.grad) <= TOL


@pytest.mark.parametrize("chunk", [2, 5, 64])
def test_token_kl_matches_reference(chunk):
    torch.manual_seed(3)
    student = (torch.randn(3, 4, 23) * 2).requires_grad_()
    teacher = torch.randn(3, 4, 23) * 2
    g = torch.randn(3, 4)
    kl = vocab_parallel_kl(student, teacher, chunk_size=chunk)
    (kl * g).sum().backward()
    ours = student.grad.clone()
    student.grad = None
    ref = ref_kl(student, teacher)
    (ref * g).sum().backward()
    assert _max_diff(kl, ref) <= TOL and _max_diff(ours, student.grad) <= TOL
    assert (kl >= -TOL).all()


def test_token_kl_indexed_positions_in_one_tensor():
    # student rows and teacher rows live in the same micro-batch at different offsets.
    torch.manual_seed(4)
    logits = torch.randn(2, 6, 13, requires_grad=True)
    s_idx = torch.tensor([2, 3, 4])        # row 0, positions 2..4
    t_idx = torch.tensor([6 + 1, 6 + 2, 6 + 3])  # row 1, positions 1..3
    kl = vocab_parallel_kl(logits, logits, chunk_size=2, student_index=s_idx, teacher_index=t_idx)
    kl.sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    flat = logits.view(-1, 13)
    ref = ref_kl(flat[s_idx], flat[t_idx])
    ref.sum().backward()
    assert _max_diff(kl, ref) <= TOL and _max_diff(ours, logits.grad) <= TOL
    assert ours.view(-1, 13)[t_idx].abs().max() == 0  # teacher branch detached: no gradient there
    assert ours.view(-1, 13)[s_idx].abs().min() > 0


def test_kl_of_identical_distributions_is_zero():
    x = torch.randn(4, 10)
    assert vocab_parallel_kl(x, x + 5.0).abs().max() <= TOL  # shift-invariant softmax


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="targets shape"):
        vocab_parallel_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be"):
        vocab_parallel_logprobs_from_hidden(torch.randn(2, 4), torch.randn(5, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), chunk_size=0)


def test_bf16_logits_are_upcast_and_gradient_keeps_dtype():
    torch.manual_seed(5)
    logits = (torch.randn(6, 31) * 3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 31, (6,))
    lp, ent = vocab_parallel_logprobs(logits, targets, chunk_size=4, with_entropy=True)
    assert lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_in = logits.detach().float().requires_grad_()
    rlp, rent = ref_logprobs(ref_in, targets)
    (rlp.sum() + rent.sum()).backward()
    assert _max_diff(lp, rlp) <= TOL and _max_diff(ent, rent) <= TOL  # same bf16 values, fp32 math
    assert _max_diff(logits.grad.float(), ref_in.grad) <= 1e-2       # bf16 rounding of the gradient
