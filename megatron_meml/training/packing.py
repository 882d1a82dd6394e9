"""A TrainBatch into micro-batches, two ways.

* ``split_batch``: by row count (``train.micro_batch_size``), each micro-batch padded to its longest row.
* ``split_packed``: by token budget (``train.max_tokens_per_micro_batch``), rows laid end to end without padding in
  Megatron's THD layout (``PackedRows``), as Megatron-LM RL, NeMo-RL, verl and slime pack rollouts. Rollout rows
  range from a few dozen to hundreds of tokens, so padding to the longest row of a micro-batch wastes compute.

With ``share_prompts``, rows of one micro-batch whose prompts are the same tokens (the G samples of a group) share
one copy of the prompt in the packed stream: each response is its own sequence that also attends to the prompt
sequence before it (``PackedRows.prefix_of``), at its true RoPE positions. On the real model's RL rows the prompt
is about two thirds of a row, and a group of 8 computes it once instead of 8 times.

Both keep a mutual-learning pair (STUDENT + TEACHER row of the same pair) in one micro-batch. Every loss term is a
sum divided by a global normaliser (forward_step.py), so the step's objective does not depend on how rows are
grouped: packed and padded steps give the same gradients (tests/distributed/test_train_step_parity.py).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch

from megatron_meml.training.forward_step import GRPO, STUDENT, TEACHER, MicroBatch, PackedRows
from megatron_meml.types import TrainBatch


def row_units(row_kind: torch.Tensor, pair_id: Optional[torch.Tensor], *,
              pairs_together: bool = True) -> list[list[int]]:
    """Rows in order as the units micro-batches are made of: a mutual-learning pair (STUDENT + TEACHER with the
    same pair_id) is one unit [student, teacher]. With ``pairs_together=False`` (teachers scored ahead, no TEACHER
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
    return units


def pack_rows(row_kind: torch.Tensor, pair_id: Optional[torch.Tensor], micro_batch_size: int, *,
              pairs_together: bool = True) -> list[list[int]]:
    """Row indices of each micro-batch of at most ``micro_batch_size`` rows: units (``row_units``) in order."""
    units = row_units(row_kind, pair_id, pairs_together=pairs_together)
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


def _labels(batch: TrainBatch, pad_id: int) -> torch.Tensor:
    labels = torch.full_like(batch.tokens, pad_id)
    labels[:, :-1] = batch.tokens[:, 1:]
    return labels


def _micro_batch(batch: TrainBatch, labels: torch.Tensor, rows: list[int], n: int, t: int, pad_id: int,
                 teacher_seq: Optional[torch.Tensor], packed: Optional[PackedRows] = None) -> MicroBatch:
    """The MicroBatch of ``rows`` (padded with score-nothing rows to ``n``), its row-form tensors cut to ``t``."""
    kind = _take(batch.row_kind, rows, n, GRPO)
    partner = torch.full((n,), -1, dtype=torch.long)
    if batch.pair_id is not None and teacher_seq is None:
        local = {r: i for i, r in enumerate(rows)}
        for i, r in enumerate(rows):
            if int(batch.row_kind[r]) == STUDENT:
                pid = int(batch.pair_id[r])
                partner[i] = next(local[q] for q in rows if int(batch.row_kind[q]) == TEACHER
                                  and int(batch.pair_id[q]) == pid)
    return MicroBatch(
        tokens=_take(batch.tokens, rows, n, pad_id, t), labels=_take(labels, rows, n, pad_id, t),
        loss_mask=_take(batch.loss_mask, rows, n, 0.0, t), row_kind=kind,
        advantages=_take(batch.advantages, rows, n, 0.0), partner=partner,
        old_logprobs=_take(batch.old_logprobs, rows, n, 0.0, t),
        rollout_logprobs=_take(batch.rollout_logprobs, rows, n, 0.0, t),
        ref_logprobs=_take(batch.ref_logprobs, rows, n, 0.0, t), teacher_seq=_take(teacher_seq, rows, n, 0.0),
        packed=packed)


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
    labels = _labels(batch, pad_id)
    micro = []
    for rows in groups:
        t, n = batch.tokens.shape[1], len(rows) if trim_rows else micro_batch_size
        if trim_multiple:
            t = scored_length(batch.loss_mask[rows], t, trim_multiple)
        micro.append(_micro_batch(batch, labels, rows, n, t, pad_id, teacher_seq))
    return micro, groups


def row_lengths(loss_mask: torch.Tensor) -> list[int]:
    """Tokens each row needs in a packed stream: positions 0..its last scored position (that position's label is
    the next token, kept in the packed labels); 1 for a row that scores nothing."""
    t = loss_mask.shape[1]
    pos = torch.arange(t).expand_as(loss_mask)
    last = torch.where(loss_mask > 0, pos, torch.full_like(pos, -1)).max(dim=1).values
    return [max(int(x) + 1, 1) for x in last]


def token_bins(units: list[list[int]], lengths: list[int], budget: int,
               sizes: Optional[list[int]] = None) -> list[list[int]]:
    """Units into bins of at most ``budget`` tokens by first-fit decreasing (longest unit first, ties by
    position; deterministic); a unit longer than the budget gets a bin of its own. Units within a bin keep batch
    order. ``sizes``: each unit's tokens (default: the sum of its rows' ``lengths``)."""
    size = sizes if sizes is not None else [sum(lengths[r] for r in u) for u in units]
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(units)), key=lambda i: (-size[i], i)):
        for b in range(len(bins)):
            if used[b] + size[i] <= budget:
                bins[b].append(i)
                used[b] += size[i]
                break
        else:
            bins.append([i])
            used.append(size[i])
    return [[r for i in sorted(b) for r in units[i]] for b in bins]


def prompt_keys(batch: TrainBatch) -> list[Optional[tuple[int, ...]]]:
    """Each row's prompt: its tokens up to and including its first scored position (whose label is the first
    response token); rows with the same key can share it. None for a row that scores nothing."""
    keys: list[Optional[tuple[int, ...]]] = []
    for r in range(batch.tokens.shape[0]):
        scored = batch.loss_mask[r].nonzero()
        keys.append(tuple(batch.tokens[r, :int(scored[0]) + 1].tolist()) if len(scored) else None)
    return keys


def prompt_units(units: list[list[int]], keys: list, lengths: list[int],
                 budget: int) -> tuple[list[list[int]], list[int]]:
    """(units, their packed tokens): single-row units with the same prompt key merged into one unit at the
    first one's place (batch order kept), cut into pieces that each fit ``budget`` with one copy of the prompt;
    a piece costs the prompt once plus each row's response. Mutual-learning pairs stay as they are."""
    groups: dict = {}
    for i, u in enumerate(units):
        if len(u) == 1 and keys[u[0]] is not None:
            groups.setdefault(keys[u[0]], []).append(i)
    first = {members[0]: key for key, members in groups.items() if len(members) > 1}
    merged = {i for key, members in groups.items() if len(members) > 1 for i in members}
    out, sizes = [], []
    for i, u in enumerate(units):
        if i in first:
            key = first[i]
            p = len(key)
            piece, cost = [], p
            for r in (units[j][0] for j in groups[key]):
                if piece and cost + lengths[r] - p > budget:
                    out.append(piece)
                    sizes.append(cost)
                    piece, cost = [], p
                piece.append(r)
                cost += lengths[r] - p
            out.append(piece)
            sizes.append(cost)
        elif i not in merged:
            out.append(u)
            sizes.append(sum(lengths[r] for r in u))
    return out, sizes


def _stream_tokens(rows: list[int], lengths: list[int], keys: Optional[list]) -> int:
    """Tokens the packed stream of ``rows`` holds: each row's length, a prompt shared by several rows once."""
    if keys is None:
        return sum(lengths[r] for r in rows)
    count = Counter(keys[r] for r in rows)
    shared = sum(len(k) * (c - 1) for k, c in count.items() if k is not None and c > 1)
    return sum(lengths[r] for r in rows) - shared


def _packed_rows(batch: TrainBatch, labels: torch.Tensor, rows: list[int], lengths: list[int], total: int,
                 pad_id: int, keys: Optional[list] = None) -> PackedRows:
    """The packed stream of ``rows``, padded up to ``total`` tokens by one trailing padding sequence. With
    ``keys`` (``prompt_keys``), rows of the same prompt key share one prompt sequence: each row's response is a
    sequence of its own after it (``prefix_of``), with RoPE positions continuing from the prompt's."""
    count = Counter(keys[r] for r in rows) if keys is not None else Counter()
    seqs: list[int] = []
    prefix_of: list[int] = []
    toks, labs, pos = [], [], []
    width = max(lengths[r] for r in rows)
    index = torch.full((len(rows), width), -1, dtype=torch.long)
    prompt_at: dict = {}  # prompt key -> (its sequence, where it starts in the stream)
    start = 0

    def emit(r: int, a: int, b: int, prefix: int) -> None:
        nonlocal start
        seqs.append(b - a)
        prefix_of.append(prefix)
        toks.append(batch.tokens[r, a:b])
        labs.append(labels[r, a:b])
        pos.append(torch.arange(a, b))
        start += b - a

    for i, r in enumerate(rows):
        n, key = lengths[r], (keys[r] if keys is not None else None)
        if key is None or count[key] < 2:
            index[i, :n] = torch.arange(start, start + n)
            emit(r, 0, n, -1)
            continue
        p = len(key)
        if key not in prompt_at:
            prompt_at[key] = (len(seqs), start)
            emit(r, 0, p, -1)
        seq, at = prompt_at[key]
        index[i, :p] = torch.arange(at, at + p)
        if n > p:
            index[i, p:n] = torch.arange(start, start + n - p)
            emit(r, p, n, seq)
    pad = total - start
    if pad > 0:
        seqs.append(pad)
        prefix_of.append(-1)
        toks.append(torch.full((pad,), pad_id, dtype=batch.tokens.dtype))
        labs.append(torch.full((pad,), pad_id, dtype=labels.dtype))
        pos.append(torch.arange(pad))
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqs, dtype=torch.int32), 0)
    shared = torch.tensor(prefix_of) if any(j >= 0 for j in prefix_of) else None
    return PackedRows(tokens=torch.cat(toks)[None], labels=torch.cat(labs)[None], position_ids=torch.cat(pos)[None],
                      cu_seqlens=cu, max_seqlen=max(seqs), index=index, prefix_of=shared)


def split_packed(batch: TrainBatch, max_tokens: int, pad_id: int, *, multiple: int = 1, fixed: bool = False,
                 teacher_seq: Optional[torch.Tensor] = None, share_prompts: bool = False,
                 ) -> tuple[list[MicroBatch], list[list[int]]]:
    """Micro-batches of at most ``max_tokens`` packed tokens (``PackedRows``), each holding only its own rows.

    Each stream is padded up to a multiple of ``multiple`` (the TP size, for sequence parallelism); with
    ``fixed`` (pipeline parallelism: stages exchange activations of one shape) every stream is exactly
    ``max_tokens`` rounded up to ``multiple``, and a unit longer than that is an error. Without ``fixed`` a unit
    longer than the budget runs alone. ``teacher_seq`` as in ``split_batch``. ``share_prompts``: rows with the
    same prompt go into one micro-batch where they fit, and share one copy of it (module docstring); the model's
    output layer must then run on the scored positions only (labels differ at a shared last prompt position)."""
    units = row_units(batch.row_kind, batch.pair_id, pairs_together=teacher_seq is None)
    lengths = row_lengths(batch.loss_mask)
    budget = -(-max_tokens // multiple) * multiple
    if fixed:
        for u in units:
            need = sum(lengths[r] for r in u)
            if need > budget:
                what = "mutual-learning pair" if len(u) > 1 else "row"
                raise ValueError(f"train.max_tokens_per_micro_batch={max_tokens} is shorter than a {what} of "
                                 f"{need} tokens (rows {u}); with pipeline parallelism every micro-batch has "
                                 f"that fixed length: raise it to >= {need}")
    labels = _labels(batch, pad_id)
    keys = prompt_keys(batch) if share_prompts else None
    cap = budget if fixed else max_tokens
    units, sizes = prompt_units(units, keys, lengths, cap) if keys is not None else (units, None)
    micro, groups = [], token_bins(units, lengths, cap, sizes)
    for rows in groups:
        n = _stream_tokens(rows, lengths, keys)
        total = budget if fixed else -(-n // multiple) * multiple
        packed = _packed_rows(batch, labels, rows, lengths, total, pad_id, keys)
        micro.append(_micro_batch(batch, labels, rows, len(rows), packed.index.shape[1], pad_id, teacher_seq,
                                  packed))
    return micro, groups


def take_rows(batch: TrainBatch, rows: list[int]) -> TrainBatch:
    """The TrainBatch of ``rows`` (in that order), every per-row field kept."""
    fields = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return TrainBatch(**fields)
