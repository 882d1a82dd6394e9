"""Micro-batching of a TrainBatch (pure functions): pairs stay together, fixed row counts, padding scores nothing,
per-micro-batch trimming to the scored length (hand-worked)."""
from __future__ import annotations

import pytest
import torch

from megatron_meml.training.forward_step import GRPO, SFT, STUDENT, TEACHER
from megatron_meml.training.trainer import pack_rows, scored_length, split_batch
from megatron_meml.types import TrainBatch


def _batch():
    kinds = [GRPO, STUDENT, SFT, TEACHER, GRPO]
    mask = torch.zeros(5, 10)
    mask[0, 2:4] = 1  # last scored position 3 -> needs 5 positions
    mask[1, 3:6] = 1
    mask[2, 1:9] = 1  # scored up to 8 -> needs all 10
    mask[3, 2:5] = 1
    mask[4, 4:5] = 1
    return TrainBatch(tokens=torch.arange(50).view(5, 10), loss_mask=mask, row_kind=torch.tensor(kinds),
                      advantages=torch.tensor([1.0, 0, 0, 0, -1.0]), pair_id=torch.tensor([-1, 7, -1, 7, -1]))


def test_pack_rows_keeps_pairs_and_order():
    b = _batch()
    assert pack_rows(b.row_kind, b.pair_id, 3) == [[0, 1, 3], [2, 4]]
    assert pack_rows(b.row_kind, b.pair_id, 2) == [[0], [1, 3], [2, 4]]
    with pytest.raises(ValueError, match="cannot hold a mutual-learning pair"):
        pack_rows(b.row_kind, b.pair_id, 1)
    with pytest.raises(ValueError, match="student without a teacher"):
        pack_rows(b.row_kind, torch.tensor([-1, 7, -1, 8, -1]), 3)


def test_scored_length_hand_worked():
    m = torch.zeros(2, 10)
    m[0, 3] = 1
    assert scored_length(m, 10) == 5  # position 3 predicts token 4: positions 0..4
    assert scored_length(m, 10, multiple=4) == 8
    m[1, 8] = 1
    assert scored_length(m, 10) == 10 and scored_length(m, 10, multiple=4) == 10  # capped at T
    assert scored_length(torch.zeros(1, 10), 10) == 2


def test_split_batch_shapes_padding_partner_and_trim():
    b = _batch()
    micro, groups = split_batch(b, 3, pad_id=0)
    assert groups == [[0, 1, 3], [2, 4]]
    assert [tuple(m.tokens.shape) for m in micro] == [(3, 10), (3, 10)]
    assert micro[0].partner.tolist() == [-1, 2, -1]  # the student's teacher is row 2 of its micro-batch
    assert micro[1].loss_mask[2].sum() == 0 and micro[1].tokens[2].tolist() == [0] * 10  # padding row
    assert micro[0].labels[0, :9].tolist() == list(range(1, 10))  # labels are the next tokens
    trimmed, _ = split_batch(b, 3, pad_id=0, trim_multiple=1)
    assert [m.tokens.shape[1] for m in trimmed] == [7, 10]  # rows 0,1,3 scored up to 5; rows 2,4 up to 8
    torch.testing.assert_close(trimmed[0].loss_mask, micro[0].loss_mask[:, :7])
    assert micro[0].loss_mask[:, 7:].sum() == 0  # nothing scored was cut
    rows_only, _ = split_batch(b, 3, pad_id=0, trim_multiple=1, trim_rows=True)
    assert [tuple(m.tokens.shape) for m in rows_only] == [(3, 7), (2, 10)]  # no padding rows without PP
    torch.testing.assert_close(rows_only[1].loss_mask, micro[1].loss_mask[:2])
    assert rows_only[0].partner.tolist() == [-1, 2, -1]


def test_students_without_teachers_when_teachers_were_scored_ahead():
    b = _batch()
    rest = [0, 1, 2, 4]  # the TEACHER row (3) scored ahead and dropped
    kept = TrainBatch(tokens=b.tokens[rest], loss_mask=b.loss_mask[rest], row_kind=b.row_kind[rest],
                      advantages=b.advantages[rest], pair_id=b.pair_id[rest])
    with pytest.raises(ValueError, match="student without a teacher"):
        pack_rows(kept.row_kind, kept.pair_id, 3)
    assert pack_rows(kept.row_kind, kept.pair_id, 1, pairs_together=False) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="TEACHER rows"):
        pack_rows(b.row_kind, b.pair_id, 3, pairs_together=False)
    seq = torch.tensor([0.0, -2.5, 0.0, 0.0])
    micro, groups = split_batch(kept, 3, pad_id=0, teacher_seq=seq)
    assert groups == [[0, 1, 2], [3]]
    assert micro[0].partner.tolist() == [-1, -1, -1] and micro[0].teacher_seq.tolist() == [0.0, -2.5, 0.0]
    assert micro[1].teacher_seq.tolist() == [0.0, 0.0, 0.0]  # padding rows
    assert split_batch(b, 3, pad_id=0)[0][0].teacher_seq is None  # teachers in the batch: none scored ahead
