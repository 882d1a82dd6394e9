"""Vocab-parallel log-probs, entropy and token-level KL, chunked over tokens, with exact gradients.

Layout. Each rank of the tensor-parallel group ``group`` holds one vocabulary shard of the logits,
``[..., V_local]`` with any leading dims ([B, T] or Megatron's [T, B]); rank r owns the global ids
``[r * V_local, (r + 1) * V_local)``. ``group=None`` (or a group of size 1) means no communication: the
last dim is the whole vocabulary. The full vocabulary is never gathered: per token, only a few scalars
(max / log-sum-exp, target logit, entropy terms) cross ranks through ``all_reduce``.

Memory. Each function is a custom autograd Function that keeps only its inputs and O(tokens) statistics
for backward and recomputes the softmax one chunk of ``chunk_size`` tokens at a time, so the extra
memory beyond the logits and their gradient is O(chunk_size * V_local). The hidden-state path goes one
step further: it takes hidden states [..., H] and the output-layer weight shard [V_local, H] and never
holds more than one chunk of logits, forward or backward.

Gradients. The loss built on these outputs must be the same on every rank of ``group`` (as in Megatron,
where every TP rank computes the same loss): the gradient each rank returns for its logit shard is then
the slice of the full-vocabulary gradient, and needs no communication, because the global statistics
saved by the forward already normalise the softmax. For the hidden-state path the hidden states are the
replicated input of the vocab-parallel output layer, so their gradient (a partial sum over the local
shard) is all-reduced over ``group`` and every rank gets the full gradient; pass the hidden states from
*before* any Megatron ``copy_to_tensor_model_parallel_region`` (which would all-reduce a second time).
Targets outside ``[0, V)`` (e.g. an ignore index on padding) give finite garbage: mask them in the loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_CHUNK = 512
"""Tokens per chunk: the transient buffers are a few chunk_size x V_local fp32 tensors."""


def _world(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _shard_offset(group: Optional[dist.ProcessGroup], v_local: int) -> int:
    return 0 if _world(group) == 1 else dist.get_rank(group) * v_local


def _chunks(n: int, chunk_size: int):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _local_target(targets: torch.Tensor, offset: int, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] global ids -> ([n] local index clamped into range, [n] bool: the id lives on this shard)."""
    local = targets - offset
    inside = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), inside


def _softmax_stats(x: torch.Tensor, targets: torch.Tensor, offset: int, group, with_entropy: bool):
    """Global statistics of one chunk of fp32 logits x [n, V_local].

    Returns (lse [n], target_logit [n], entropy [n] or None). Each rank computes its shard's
    log-sum-exp lse_r and the entropy h_r of its shard-normalised softmax; with w_r = exp(lse_r - lse),
    lse = log sum_r exp(lse_r) and H = sum_r w_r (h_r - log w_r). Two small all_reduces per chunk.
    """
    v_local = x.shape[-1]
    idx, inside = _local_target(targets, offset, v_local)
    tgt = x.gather(-1, idx[:, None]).squeeze(-1) * inside
    lse_r = torch.logsumexp(x, dim=-1)
    h_r = None
    if with_entropy:
        logq = x - lse_r[:, None]
        h_r = -(logq.exp() * logq).sum(-1)
        del logq
    if _world(group) == 1:
        return lse_r, tgt, h_r
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    w = (lse_r - m).exp()
    parts = [w, tgt] + ([w * h_r, w * (lse_r - m)] if with_entropy else [])
    packed = torch.stack(parts)
    dist.all_reduce(packed, group=group)
    total = packed[0]
    lse = m + total.log()
    entropy = None
    if with_entropy:
        # log(w_r / W) = (lse_r - m) - log W, so H = sum w_r h_r / W - sum w_r (lse_r - m) / W + log W.
        entropy = (packed[2] - packed[3]) / total + total.log()
    return lse, packed[1], entropy


def _logprob_grad(logp: torch.Tensor, targets: torch.Tensor, offset: int, entropy: Optional[torch.Tensor],
                  g_lp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor]) -> torch.Tensor:
    """Gradient wrt one chunk of local logits, no communication; overwrites and returns ``logp``.

    logp [n, V_local] fp32 = x - lse (global log-softmax of the shard, a buffer the caller owns).
    d logp(t)/dx_v = 1[v = t] - p_v;  dH/dx_v = -p_v (log p_v + H).
    """
    coef = torch.zeros_like(logp[:, 0]) if g_lp is None else g_lp.float()
    if g_ent is not None:
        p = logp.exp()
        grad = logp.add_(entropy[:, None]).mul_(g_ent.float()[:, None]).add_(coef[:, None]).mul_(p).neg_()
        del p
    else:
        grad = logp.exp_().mul_(-coef[:, None])
    if g_lp is not None:
        idx, inside = _local_target(targets, offset, logp.shape[-1])
        grad.scatter_add_(-1, idx[:, None], (coef * inside)[:, None])
    return grad


class _LogitsLogprob(torch.autograd.Function):
    """(logits [N, V_local], targets [N]) -> logp [N] (and entropy [N])."""

    @staticmethod
    def forward(ctx, logits, targets, group, chunk_size, with_entropy):
        ctx.set_materialize_grads(False)
        offset = _shard_offset(group, logits.shape[-1])
        n = logits.shape[0]
        lse = logits.new_empty(n, dtype=torch.float32)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if with_entropy else None
        for s, e in _chunks(n, chunk_size):
            c_lse, c_tgt, c_ent = _softmax_stats(logits[s:e].float(), targets[s:e], offset, group, with_entropy)
            lse[s:e] = c_lse
            logp[s:e] = c_tgt - c_lse
            if with_entropy:
                ent[s:e] = c_ent
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.meta = (offset, chunk_size)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        logits, targets, lse, ent = ctx.saved_tensors
        offset, chunk_size = ctx.meta
        if g_lp is None and g_ent is None:
            return torch.zeros_like(logits), None, None, None, None
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # every chunk overwrites
        for s, e in _chunks(logits.shape[0], chunk_size):
            x = logits[s:e]
            # write x - lse straight into the gradient buffer when it is fp32 (no extra chunk copy)
            buf = torch.sub(x, lse[s:e, None], out=grad[s:e]) if x.dtype == torch.float32 else \
                x.float() - lse[s:e, None]
            out = _logprob_grad(buf, targets[s:e], offset, None if ent is None else ent[s:e],
                                None if g_lp is None else g_lp[s:e], None if g_ent is None else g_ent[s:e])
            if out.data_ptr() != grad[s:e].data_ptr():
                grad[s:e] = out
        return grad, None, None, None, None


class _HiddenLogprob(torch.autograd.Function):
    """(hidden [N, H], weight [V_local, H], targets [N]) -> logp [N] (and entropy [N]), logits per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, group, chunk_size, with_entropy):
        ctx.set_materialize_grads(False)
        offset = _shard_offset(group, weight.shape[0])
        n = hidden.shape[0]
        lse = hidden.new_empty(n, dtype=torch.float32)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if with_entropy else None
        for s, e in _chunks(n, chunk_size):
            x = (hidden[s:e] @ weight.t()).float()
            c_lse, c_tgt, c_ent = _softmax_stats(x, targets[s:e], offset, group, with_entropy)
            del x
            lse[s:e] = c_lse
            logp[s:e] = c_tgt - c_lse
            if with_entropy:
                ent[s:e] = c_ent
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.meta = (offset, chunk_size, group)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        offset, chunk_size, group = ctx.meta
        grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if g_lp is None and g_ent is None:
            return grad_h, grad_w.to(weight.dtype), None, None, None, None
        for s, e in _chunks(hidden.shape[0], chunk_size):
            x = (hidden[s:e] @ weight.t()).float().sub_(lse[s:e, None])
            gx = _logprob_grad(x, targets[s:e], offset, None if ent is None else ent[s:e],
                               None if g_lp is None else g_lp[s:e], None if g_ent is None else g_ent[s:e])
            del x
            gx = gx.to(hidden.dtype)
            torch.mm(gx, weight, out=grad_h[s:e])
            grad_w.addmm_(gx.t().to(torch.float32), hidden[s:e].to(torch.float32))
            del gx
        if _world(group) > 1:
            dist.all_reduce(grad_h, group=group)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                            group: Optional[dist.ProcessGroup] = None, *, chunk_size: int = DEFAULT_CHUNK,
                            with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of each target token, and optionally the full-distribution entropy, from sharded logits.

    logits [..., V_local] (this rank's vocab shard, any float dtype); targets [...] int64 global ids.
    Returns (logprobs [...] fp32, entropy [...] fp32 or None). Differentiable wrt logits (both outputs).
    """
    lead = logits.shape[:-1]
    if targets.shape != lead:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape[:-1] {tuple(lead)}")
    flat = logits.reshape(-1, logits.shape[-1])
    out = _LogitsLogprob.apply(flat, targets.reshape(-1), group, chunk_size, with_entropy)
    if with_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead), None


def vocab_parallel_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                        group: Optional[dist.ProcessGroup] = None, *,
                                        chunk_size: int = DEFAULT_CHUNK, with_entropy: bool = False,
                                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Like ``vocab_parallel_logprobs`` with logits = hidden @ weight.T computed one chunk at a time.

    hidden [..., H] (replicated over ``group``); weight [V_local, H] (this rank's output-layer shard);
    targets [...] int64 global ids. Returns (logprobs [...] fp32, entropy [...] fp32 or None).
    Gradients flow to hidden (all-reduced over ``group``) and to weight (local shard).
    """
    lead = hidden.shape[:-1]
    if targets.shape != lead:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden shape[:-1] {tuple(lead)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V_local, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = _HiddenLogprob.apply(flat, weight, targets.reshape(-1), group, chunk_size, with_entropy)
    if with_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead), None


def _kl_stats(xs: torch.Tensor, xt: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of fp32 student/teacher logits [n, V_local] -> (kl [n], lse_s [n], lse_t [n]).

    KL(p_t || p_s) = sum_v p_t,v (t_v - s_v) - lse_t + lse_s; the cross term is a w-weighted sum over
    ranks of each shard's sum_v q_t,v (t_v - s_v), q_t the shard-normalised teacher softmax.
    """
    lse_s, lse_t = torch.logsumexp(xs, dim=-1), torch.logsumexp(xt, dim=-1)
    cross = ((xt - lse_t[:, None]).exp() * (xt - xs)).sum(-1)
    if _world(group) == 1:
        return cross - lse_t + lse_s, lse_s, lse_t
    m = torch.stack([lse_s, lse_t])
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    ws, wt = (lse_s - m[0]).exp(), (lse_t - m[1]).exp()
    packed = torch.stack([ws, wt, wt * cross])
    dist.all_reduce(packed, group=group)
    g_lse_s, g_lse_t = m[0] + packed[0].log(), m[1] + packed[1].log()
    return packed[2] / packed[1] - g_lse_t + g_lse_s, g_lse_s, g_lse_t


class _TokenKL(torch.autograd.Function):
    """(student [Ns, V_local], teacher [Nt, V_local], s_idx [M], t_idx [M]) -> KL(teacher || student) [M]."""

    @staticmethod
    def forward(ctx, student, teacher, s_idx, t_idx, group, chunk_size):
        m = s_idx.shape[0]
        kl = student.new_empty(m, dtype=torch.float32)
        lse_s, lse_t = torch.empty_like(kl), torch.empty_like(kl)
        for a, b in _chunks(m, chunk_size):
            kl[a:b], lse_s[a:b], lse_t[a:b] = _kl_stats(student[s_idx[a:b]].float(), teacher[t_idx[a:b]].float(),
                                                        group)
        ctx.save_for_backward(student, teacher, s_idx, t_idx, lse_s, lse_t)
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    def backward(ctx, g):
        student, teacher, s_idx, t_idx, lse_s, lse_t = ctx.saved_tensors
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        for a, b in _chunks(s_idx.shape[0], ctx.chunk_size):
            p_s = (student[s_idx[a:b]].float() - lse_s[a:b, None]).exp_()
            p_s.sub_((teacher[t_idx[a:b]].float() - lse_t[a:b, None]).exp_()).mul_(g[a:b, None].float())
            grad.index_add_(0, s_idx[a:b], p_s.to(grad.dtype))
        return grad, None, None, None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      group: Optional[dist.ProcessGroup] = None, *, chunk_size: int = DEFAULT_CHUNK,
                      student_index: Optional[torch.Tensor] = None,
                      teacher_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full-vocabulary KL(p_teacher || p_student) per position from sharded logits; teacher detached.

    Without indices: student_logits and teacher_logits are [..., V_local] of equal shape; returns [...].
    With indices (both [M] int64, flat positions into each tensor's leading dims, e.g. the response
    tokens of the P- and P+ rows of one micro-batch, which sit at different offsets): returns [M], and
    no [M, V_local] copy of the selected logits is ever held beyond one chunk.
    Differentiable wrt student_logits only: d KL / d s_v = p_s,v - p_t,v.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError("student_logits and teacher_logits must have the same vocab shard size")
    s_flat = student_logits.reshape(-1, student_logits.shape[-1])
    t_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    if (student_index is None) != (teacher_index is None):
        raise ValueError("pass both student_index and teacher_index, or neither")
    if student_index is None:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                             "logits must match when no indices are given")
        idx = torch.arange(s_flat.shape[0], device=s_flat.device)
        return _TokenKL.apply(s_flat, t_flat, idx, idx, group, chunk_size).view(student_logits.shape[:-1])
    if student_index.shape != teacher_index.shape or student_index.dim() != 1:
        raise ValueError("student_index and teacher_index must be 1-D and of equal length")
    return _TokenKL.apply(s_flat, t_flat, student_index, teacher_index, group, chunk_size)
