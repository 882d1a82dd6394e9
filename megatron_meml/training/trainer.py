"""The trainer: ``compute_logprobs(batch)`` and ``train_step(batch) -> metrics`` over Megatron's pipeline
schedules. It knows nothing of rollouts or rewards: a TrainBatch comes in, gradients and an optimizer step
come out."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from megatron_meml.algo.config import AlgoConfig
from megatron_meml.training.forward_step import (GRPO, STUDENT, TEACHER, MicroBatch, logprob_forward_step,
                                                 make_forward_step, step_normalisers)
from megatron_meml.training.setup import TrainState, zero_grads
from megatron_meml.types import TrainBatch


def pack_rows(row_kind: torch.Tensor, pair_id: Optional[torch.Tensor], micro_batch_size: int, *,
              pairs_together: bool = True) -> list[list[int]]:
    """Row indices of each micro-batch: rows in order, a mutual-learning pair (STUDENT + TEACHER with the same
    pair_id) never split across micro-batches. With ``pairs_together=False`` (teachers scored ahead, no TEACHER
    rows left) a STUDENT row is a row like any other."""
    units: list[list[int]] = []
    placed: set[int] = set()
    teacher_of: dict[int, int] = {}
    if not pairs_together:
        if bool((row_kind == TEACHER).any()):
            raise ValueError("pack_rows(pairs_together=False) got TEACHER rows; score them ahead and drop them")
        row_kind = torch.where(row_kind == STUDENT, GRPO, row_kind)
    if pair_id is not None:
        for r in (row_kind == TEACHER).nonzero().squeeze(-1).tolist():
            teacher_of[int(pair_id[r])] = r
    for r in range(len(row_kind)):
        if r in placed:
            continue
        if int(row_kind[r]) == STUDENT:
            pid = int(pair_id[r]) if pair_id is not None else -1
            if pid not in teacher_of:
                raise ValueError(f"TrainBatch row {r} is a mutual-learning student without a teacher row "
                                 f"(pair_id {pid})")
            units.append([r, teacher_of[pid]])
            placed.update(units[-1])
        elif int(row_kind[r]) == TEACHER:
            continue  # placed with its student
        else:
            units.append([r])
            placed.add(r)
    if any(len(u) > micro_batch_size for u in units):
        raise ValueError(f"train.micro_batch_size={micro_batch_size} cannot hold a mutual-learning pair (need >= 2)")
    micro: list[list[int]] = [[]]
    for u in units:
        if len(micro[-1]) + len(u) > micro_batch_size:
            micro.append([])
        micro[-1].extend(u)
    return [m for m in micro if m]


def _take(t: Optional[torch.Tensor], rows: list[int], n: int, fill: float = 0.0,
          length: Optional[int] = None) -> Optional[torch.Tensor]:
    """``t[rows]`` (its first ``length`` columns when given), padded with ``fill`` rows to ``n`` rows."""
    if t is None:
        return None
    out = t[rows] if length is None else t[rows, :length]
    if len(rows) < n:
        pad = torch.full((n - len(rows),) + tuple(out.shape[1:]), fill, dtype=t.dtype)
        out = torch.cat([out, pad])
    return out


def scored_length(loss_mask: torch.Tensor, total: int, multiple: int = 1) -> int:
    """Positions a micro-batch needs: up to its last scored position + 1 (the token it predicts), rounded up to
    ``multiple`` (the TP size, for sequence parallelism), at most ``total``. Later positions are right padding
    that, under the causal mask, no scored position sees."""
    scored = loss_mask.any(dim=0).nonzero()
    need = int(scored.max()) + 2 if len(scored) else 2
    need = -(-need // multiple) * multiple
    return min(total, need)


def split_batch(batch: TrainBatch, micro_batch_size: int, pad_id: int, *, trim_multiple: int = 0,
                trim_rows: bool = False, teacher_seq: Optional[torch.Tensor] = None,
                ) -> tuple[list[MicroBatch], list[list[int]]]:
    """Micro-batches of at most micro_batch_size rows. With ``trim_multiple`` > 0 each micro-batch is cut to its
    own ``scored_length``, and with ``trim_rows`` it holds only its own rows; both only without pipeline
    parallelism (pipeline stages exchange activations of one fixed shape [T, micro_batch_size, H]). Otherwise
    every micro-batch keeps the batch's full length T and is filled up to micro_batch_size with padding rows,
    which score nothing.
    ``teacher_seq`` [B] (a STUDENT row's teacher sequence log-prob, scored ahead; the batch then has no TEACHER
    rows) lets students go into any micro-batch without their teacher."""
    groups = pack_rows(batch.row_kind, batch.pair_id, micro_batch_size, pairs_together=teacher_seq is None)
    labels = torch.full_like(batch.tokens, pad_id)
    labels[:, :-1] = batch.tokens[:, 1:]
    micro = []
    for rows in groups:
        t, n = batch.tokens.shape[1], len(rows) if trim_rows else micro_batch_size
        if trim_multiple:
            t = scored_length(batch.loss_mask[rows], t, trim_multiple)
        kind = _take(batch.row_kind, rows, n, GRPO)
        partner = torch.full((n,), -1, dtype=torch.long)
        if batch.pair_id is not None and teacher_seq is None:
            local = {r: i for i, r in enumerate(rows)}
            for i, r in enumerate(rows):
                if int(batch.row_kind[r]) == STUDENT:
                    pid = int(batch.pair_id[r])
                    partner[i] = next(local[q] for q in rows if int(batch.row_kind[q]) == TEACHER
                                      and int(batch.pair_id[q]) == pid)
        micro.append(MicroBatch(
            tokens=_take(batch.tokens, rows, n, pad_id, t), labels=_take(labels, rows, n, pad_id, t),
            loss_mask=_take(batch.loss_mask, rows, n, 0.0, t), row_kind=kind,
            advantages=_take(batch.advantages, rows, n, 0.0), partner=partner,
            old_logprobs=_take(batch.old_logprobs, rows, n, 0.0, t),
            rollout_logprobs=_take(batch.rollout_logprobs, rows, n, 0.0, t),
            ref_logprobs=_take(batch.ref_logprobs, rows, n, 0.0, t), teacher_seq=_take(teacher_seq, rows, n, 0.0)))
    return micro, groups


def take_rows(batch: TrainBatch, rows: list[int]) -> TrainBatch:
    """The TrainBatch of ``rows`` (in that order), every per-row field kept."""
    fields = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return TrainBatch(**fields)


def teacher_ahead(algo: AlgoConfig) -> bool:
    """The mutual-learning teacher rows need no gradient and only their sequence log-prob (sequence KL, no
    teacher NLL): they are scored by one no-grad forward before the step instead of riding forward *and*
    backward in the micro-batches (a backward over a row costs about twice its forward, gradient or not)."""
    return algo.mutual_kind == "sequence" and algo.mutual_teacher_nll == 0


def empty_step_metrics() -> dict[str, float]:
    """A step in which no DP rank scores anything (no GRPO token, pair or SFT token: e.g. every advantage <= 0
    under the paper's loss). It runs no forward, backward or optimizer step, on every rank alike (the counts are
    global): the gradient would be exactly zero, and AdamW on a zero gradient still moves the weights along its
    momentum, which no data asked for. On the real model this was 1.3-2.3 s per empty step (docs/performance.md)."""
    return {"train/loss": 0.0, "train/grad_norm": 0.0, "train/update_skipped": 1.0, "train/empty_step": 1.0}


class Trainer:
    """Runs Megatron's forward/backward schedule on TrainBatches for one model replica."""

    def __init__(self, state: TrainState, algo: AlgoConfig, *, micro_batch_size: int, pad_id: int,
                 score_teachers_ahead: bool = True):
        from megatron.core import parallel_state as ps

        self.state, self.algo = state, algo
        self.score_teachers_ahead = score_teachers_ahead and teacher_ahead(algo)
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.is_last = ps.is_pipeline_last_stage()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()
        # Without PP each micro-batch runs at its own length (a multiple of TP, for sequence parallelism) and
        # with its own rows only (a step of 3 rows at micro_batch_size 8 once ran 8 rows, 5 of them padding).
        pp_size = ps.get_pipeline_model_parallel_world_size()
        self.trim_multiple = ps.get_tensor_model_parallel_world_size() if pp_size == 1 else 0
        self.trim_rows = pp_size == 1

    def _schedule(self, fwd, micro: list[MicroBatch], forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        model = self.state.model
        it = iter(micro) if len(model) == 1 else [iter(micro) for _ in model]
        return get_forward_backward_func()(
            forward_step_func=fwd, data_iterator=it, model=model, num_microbatches=len(micro),
            seq_length=micro[0].tokens.shape[1], micro_batch_size=self.micro_batch_size, forward_only=forward_only)

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] fp32 log-probs of each next token under the current weights (no grad), on every PP rank."""
        micro, groups = split_batch(batch, self.micro_batch_size, self.pad_id, trim_rows=self.trim_rows)
        for chunk in self.state.model:
            chunk.eval()
        with torch.no_grad():
            outs = self._schedule(logprob_forward_step(self.tp_group), micro, forward_only=True)
        for chunk in self.state.model:
            chunk.train()
        result = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        if self.is_last:
            for rows, out in zip(groups, outs):
                result[rows] = out["logprobs"][: len(rows)].float().cpu()
        if dist.get_world_size(self.pp_group) > 1:
            dist.broadcast(result, src=self.last_rank, group=self.pp_group)
        return result

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """Forward/backward over all micro-batches, one optimizer step; metrics summed over the step."""
        teacher_seq = None
        if self.score_teachers_ahead and bool((batch.row_kind == TEACHER).any()):
            batch, teacher_seq = self._score_teachers(batch)
        micro, _ = split_batch(batch, self.micro_batch_size, self.pad_id, trim_multiple=self.trim_multiple,
                               trim_rows=self.trim_rows, teacher_seq=teacher_seq)
        norm = step_normalisers(micro, self.algo, self.dp_group)
        if norm.scored == 0:
            return empty_step_metrics()
        dp = dist.get_world_size(self.dp_group)
        fwd = make_forward_step(norm, self.algo, num_microbatches=len(micro), dp_size=dp, tp_group=self.tp_group)
        zero_grads(self.state)
        outs = self._schedule(fwd, micro, forward_only=False)
        ok, grad_norm, _ = self.state.optimizer.step()
        metrics = self._reduce(outs)
        metrics["train/grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["train/update_skipped"] = 0.0 if ok else 1.0
        metrics["train/empty_step"] = 0.0
        return metrics

    def _score_teachers(self, batch: TrainBatch) -> tuple[TrainBatch, torch.Tensor]:
        """(the batch without its TEACHER rows, [B'] each STUDENT row's teacher log pi(O+ | Q, P+) under the
        current weights, 0 elsewhere). Same weights and tokens as in the micro-batch, so the same value."""
        kind = batch.row_kind
        teachers = (kind == TEACHER).nonzero().squeeze(-1).tolist()
        rest = (kind != TEACHER).nonzero().squeeze(-1).tolist()
        scored = take_rows(batch, teachers)
        scored = dataclasses.replace(scored, row_kind=torch.full_like(scored.row_kind, GRPO))  # plain rows, unpaired
        lp = self.compute_logprobs(scored)
        seq_of = dict(zip(scored.pair_id.tolist(), (lp * scored.loss_mask).sum(-1).tolist()))
        out = take_rows(batch, rest)
        teacher_seq = torch.tensor([seq_of[int(p)] if int(k) == STUDENT else 0.0
                                    for k, p in zip(out.row_kind, out.pair_id)], dtype=torch.float32)
        return out, teacher_seq

    def _reduce(self, outs: list[dict]) -> dict[str, float]:
        """Sum-form metrics: summed over micro-batches, then over DP; broadcast to every PP rank."""
        box: list[Optional[dict]] = [None]
        if self.is_last:
            keys = {k for o in outs for k in o}
            if dist.get_world_size(self.dp_group) > 1:  # ranks may lack a term (no pairs, no SFT rows)
                every: list = [None] * dist.get_world_size(self.dp_group)
                dist.all_gather_object(every, keys, group=self.dp_group)
                keys = set().union(*every)
            keys = sorted(keys)
            vec = torch.tensor([sum(float(o[k]) for o in outs if k in o) for k in keys], dtype=torch.float64)
            if dist.get_world_size(self.dp_group) > 1:
                dist.all_reduce(vec, group=self.dp_group)
            box[0] = dict(zip(keys, vec.tolist()))
        if dist.get_world_size(self.pp_group) > 1:
            dist.broadcast_object_list(box, src=self.last_rank, group=self.pp_group)
        return dict(box[0] or {})
