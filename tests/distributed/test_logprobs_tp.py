"""TP=2 vocab-parallel log-probs / entropy / token KL vs the single-process full-vocabulary reference.

Every rank builds the same full tensors from one seed, keeps its vocab shard, runs the vocab-parallel
function over the world group, and compares values and its local gradient shard with the reference
(fp32, max abs diff <= 1e-5).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_meml.algo.logprobs import (vocab_parallel_kl, vocab_parallel_logprobs,
                                         vocab_parallel_logprobs_from_hidden)

pytestmark = pytest.mark.distributed
TOL = 1e-5


def _check(name, ours, ref):
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"{name}: max abs diff {diff:.3e} > {TOL}"


def _shard(full, rank, world):
    v_local = full.shape[-1] // world
    return full[..., rank * v_local:(rank + 1) * v_local]


def _logits_body(rank, world):
    group = dist.group.WORLD
    torch.manual_seed(0)
    b, t, v = 3, 5, 2 * 19
    full = torch.randn(b, t, v) * 3
    full[0, 0, 0] = 30.0  # one token whose mass sits on rank 0's shard only
    targets = torch.randint(0, v, (b, t))
    targets[1, :] = torch.tensor([0, v // 2 - 1, v // 2, v - 1, 1])  # shard boundaries
    g_lp, g_ent = torch.randn(b, t), torch.randn(b, t)

    ref_in = full.clone().requires_grad_()
    logp = torch.log_softmax(ref_in, -1)
    r_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    r_ent = -(logp.exp() * logp).sum(-1)
    (r_lp * g_lp + r_ent * g_ent).sum().backward()

    local = _shard(full, rank, world).clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(local, targets, group, chunk_size=4, with_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    _check("logprobs", lp, r_lp)
    _check("entropy", ent, r_ent)
    _check("logits grad shard", local.grad, _shard(ref_in.grad, rank, world))

    # Megatron layout [T, B, V_local] works the same (any leading dims).
    lp_tb, _ = vocab_parallel_logprobs(_shard(full, rank, world).transpose(0, 1), targets.t(), group, chunk_size=3)
    _check("logprobs [T,B]", lp_tb.t(), r_lp)


def _hidden_body(rank, world):
    group = dist.group.WORLD
    torch.manual_seed(1)
    n_b, n_t, h, v = 2, 7, 6, 2 * 17
    hidden = torch.randn(n_b, n_t, h)
    weight = torch.randn(v, h)
    targets = torch.randint(0, v, (n_b, n_t))
    g_lp, g_ent = torch.randn(n_b, n_t), torch.randn(n_b, n_t)

    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax(rh @ rw.t(), -1)
    r_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    r_ent = -(logp.exp() * logp).sum(-1)
    (r_lp * g_lp + r_ent * g_ent).sum().backward()

    v_local = v // world
    lh = hidden.clone().requires_grad_()
    lw = weight[rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs_from_hidden(lh, lw, targets, group, chunk_size=5, with_entropy=True)
    (lp * g_lp + ent * g_ent).sum().backward()
    _check("hidden logprobs", lp, r_lp)
    _check("hidden entropy", ent, r_ent)
    _check("hidden grad (all-reduced)", lh.grad, rh.grad)
    _check("weight grad shard", lw.grad, rw.grad[rank * v_local:(rank + 1) * v_local])


def _kl_body(rank, world):
    group = dist.group.WORLD
    torch.manual_seed(2)
    v = 2 * 21
    logits = torch.randn(2, 6, v) * 2
    s_idx, t_idx = torch.tensor([1, 2, 3, 4]), torch.tensor([6 + 0, 6 + 1, 6 + 2, 6 + 3])
    g = torch.randn(4)

    ref_in = logits.clone().requires_grad_()
    flat = ref_in.view(-1, v)
    lt = torch.log_softmax(flat[t_idx].detach(), -1)
    r_kl = (lt.exp() * (lt - torch.log_softmax(flat[s_idx], -1))).sum(-1)
    (r_kl * g).sum().backward()

    local = _shard(logits, rank, world).clone().requires_grad_()
    kl = vocab_parallel_kl(local, local, group, chunk_size=3, student_index=s_idx, teacher_index=t_idx)
    (kl * g).sum().backward()
    _check("token kl", kl, r_kl)
    _check("token kl grad shard", local.grad, _shard(ref_in.grad, rank, world))

    # aligned form: separate student / teacher tensors of equal shape
    student = _shard(logits[0], rank, world).clone().requires_grad_()
    kl2 = vocab_parallel_kl(student, _shard(logits[1], rank, world), group, chunk_size=4)
    lt2 = torch.log_softmax(logits[1], -1)
    _check("token kl aligned", kl2, (lt2.exp() * (lt2 - torch.log_softmax(logits[0], -1))).sum(-1))


@pytest.mark.parametrize("body", [_logits_body, _hidden_body, _kl_body], ids=["logits", "hidden", "kl"])
def test_tp2_matches_full_vocabulary(body):
    from tests.dist import run_distributed

    run_distributed(body, 2)
