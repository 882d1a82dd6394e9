"""Micro-batching of a TrainBatch (pure functions): pairs stay together, fixed row counts, padding scores nothing,
per-micro-batch trimming to the scored length (hand-worked)."""
from __future__ import annotations

import pytest
import torch

from megatron_meml.training.forward_step import GRPO, SFT, STUDENT, TEACHER
from megatron_meml.training.packing import pack_rows, scored_length, split_batch
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


def test_row_lengths_and_token_bins_hand_worked():
    from megatron_meml.training.packing import row_lengths, row_units, token_bins

    b = _batch()
    # a row needs positions 0..its last scored one (that position's label, the next token, rides in labels)
    assert row_lengths(b.loss_mask) == [4, 6, 9, 5, 5]
    assert row_lengths(torch.zeros(1, 10)) == [1]
    units = row_units(b.row_kind, b.pair_id)
    assert units == [[0], [1, 3], [2], [4]]  # the pair [student, teacher] is one unit of 6 + 5 = 11 tokens
    # first-fit decreasing: the pair (11) opens bin 0, row 2 (9) bin 1, row 0 (4) fits bin 1, row 4 (5) bin 2
    assert token_bins(units, row_lengths(b.loss_mask), 13) == [[1, 3], [0, 2], [4]]
    assert token_bins(units, row_lengths(b.loss_mask), 10) == [[1, 3], [2], [0, 4]]  # the pair runs alone
    assert token_bins(units, row_lengths(b.loss_mask), 100) == [[0, 1, 3, 2, 4]]  # units in batch order


def test_split_packed_layout_hand_worked():
    from megatron_meml.training.packing import split_packed

    b = _batch()
    micro, groups = split_packed(b, 13, pad_id=99, multiple=2)
    assert groups == [[1, 3], [0, 2], [4]]
    pair = micro[0]
    p = pair.packed
    assert p.cu_seqlens.tolist() == [0, 6, 11, 12]  # rows of 6 and 5 tokens, then 1 padding token (multiple 2)
    assert p.max_seqlen == 6 and p.tokens.shape == (1, 12)
    assert p.tokens[0].tolist() == [*range(10, 16), *range(30, 35), 99]
    assert p.labels[0].tolist() == [*range(11, 17), *range(31, 36), 99]  # each position's next token
    assert p.position_ids[0].tolist() == [*range(6), *range(5), 0]
    assert p.index.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, -1]]
    assert pair.partner.tolist() == [1, -1] and pair.loss_mask.shape == (2, 6)
    assert torch.equal(pair.loss_mask, b.loss_mask[[1, 3], :6])
    assert micro[1].packed.cu_seqlens.tolist() == [0, 4, 13, 14]
    flat = torch.arange(14.0)
    unpacked = micro[1].packed.unpack(flat)
    assert unpacked.tolist() == [[0, 1, 2, 3, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 9, 10, 11, 12]]
    # row-form flat position (row 1, t 2) = 1 * 9 + 2 -> packed position 4 + 2
    assert micro[1].packed.flat_positions(torch.tensor([11])).tolist() == [6]


def test_split_packed_fixed_length_under_pp():
    from megatron_meml.training.packing import split_packed

    b = _batch()
    micro, _ = split_packed(b, 13, pad_id=0, multiple=2, fixed=True)  # 13 -> 14, a multiple of TP
    assert [m.packed.tokens.shape[1] for m in micro] == [14, 14, 14]
    assert [m.packed.cu_seqlens[-1].item() for m in micro] == [14, 14, 14]
    with pytest.raises(ValueError, match=r"max_tokens_per_micro_batch=10 is shorter than a mutual-learning pair "
                                         r"of 11 tokens \(rows \[1, 3\]\).*raise it to >= 11"):
        split_packed(b, 10, pad_id=0, fixed=True)


def test_split_packed_teachers_ahead_unpairs_students():
    from megatron_meml.training.packing import split_packed, take_rows

    b = take_rows(_batch(), [0, 1, 2, 4])  # the teacher row scored ahead and dropped
    micro, groups = split_packed(b, 9, pad_id=0, teacher_seq=torch.tensor([0.0, -3.5, 0.0, 0.0]))
    assert sorted(r for g in groups for r in g) == [0, 1, 2, 3]
    student = next(m for m, g in zip(micro, groups) if 1 in g)
    assert student.partner.tolist() == [-1] * len(student.partner)
    assert -3.5 in student.teacher_seq.tolist()


def test_packed_needs_a_packed_attention():
    from megatron_meml.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="needs model.layer_spec sdpa, te or auto"):
        load_config(None, ["train.max_tokens_per_micro_batch=512", "model.layer_spec=local"])
    assert load_config(None, ["train.max_tokens_per_micro_batch=512"]).train.max_tokens_per_micro_batch == 512


def _group_batch():
    """Rows 0, 1, 3: one prompt (tokens 1-4, first scored position 3); row 2 another prompt; row 4 an SFT row."""
    tok = torch.arange(1, 61).view(5, 12)
    tok[[1, 3], :4] = tok[0, :4]
    mask = torch.zeros(5, 12)
    mask[0, 3:9] = 1  # 9 positions: the prompt (4) and a response of 5
    mask[1, 3:7] = 1  # 7: a response of 3
    mask[2, 2:10] = 1
    mask[3, 3:4] = 1  # only the last prompt position is scored: no response positions of its own
    mask[4, 3:8] = 1
    return TrainBatch(tokens=tok, loss_mask=mask, row_kind=torch.tensor([GRPO, GRPO, GRPO, GRPO, SFT]),
                      advantages=torch.zeros(5))


def test_split_packed_shared_prompts_hand_worked():
    from megatron_meml.training.packing import prompt_keys, split_packed

    b = _group_batch()
    keys = prompt_keys(b)
    assert keys[0] == keys[1] == keys[3] == (1, 2, 3, 4) and keys[2] == (25, 26, 27) and keys[4] == (49, 50, 51, 52)
    (mb,), groups = split_packed(b, 100, pad_id=0, multiple=2, share_prompts=True)
    assert groups == [[0, 1, 3, 2, 4]]  # the group at its first row's place
    p = mb.packed
    # the prompt (4), row 0's response (5), row 1's (3), row 2 (10), row 4 (8): 30 tokens, a multiple of 2
    assert p.cu_seqlens.tolist() == [0, 4, 9, 12, 22, 30]
    assert p.prefix_of.tolist() == [-1, 0, 0, -1, -1]
    assert p.position_ids[0].tolist() == [*range(4), *range(4, 9), *range(4, 7), *range(10), *range(8)]
    assert p.tokens[0, :12].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 18, 19]  # row 1's response: its own tokens
    assert p.index[:3].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, -1], [0, 1, 2, 3, 9, 10, 11, -1, -1, -1],
                                    [0, 1, 2, 3, -1, -1, -1, -1, -1, -1]]
    assert p.max_seqlen == 10
    # the labels of the scored positions, read through the index, are each row's own next tokens
    lp_rows = mb.labels[:, :4]
    assert lp_rows[:3, 3].tolist() == [5, 17, 41]
    # without sharing the same rows take 9 + 7 + 10 + 4 + 8 = 38 tokens
    (plain,), _ = split_packed(b, 100, pad_id=0, multiple=2)
    assert plain.packed.tokens.shape[1] == 38 and plain.packed.prefix_of is None
    from megatron_meml.training.trainer import layout_metrics

    assert layout_metrics([mb]) == {"train/model_tokens": 30.0, "train/prompt_tokens_shared": 8.0}  # 2 copies of 4
    assert layout_metrics([plain]) == {"train/model_tokens": 38.0, "train/prompt_tokens_shared": 0.0}


def test_split_packed_shared_prompts_budget_and_fixed_length():
    from megatron_meml.training.packing import split_packed

    b = _group_batch()
    micro, groups = split_packed(b, 12, pad_id=0, share_prompts=True)
    assert groups == [[0, 1, 3], [2], [4]]  # the group costs 4 + 5 + 3 + 0 = 12: one micro-batch
    assert micro[0].packed.cu_seqlens.tolist() == [0, 4, 9, 12] and micro[1].packed.prefix_of is None
    micro, groups = split_packed(b, 10, pad_id=0, share_prompts=True)
    # over budget: cut in batch order into pieces that fit, each with its own prompt copy: [0] (9), [1, 3] (7)
    assert groups == [[2], [0], [4], [1, 3]]
    assert micro[1].packed.prefix_of is None  # a piece of one row is a plain row
    assert micro[3].packed.cu_seqlens.tolist() == [0, 4, 7] and micro[3].packed.prefix_of.tolist() == [-1, 0]
    fixed, _ = split_packed(b, 12, pad_id=0, fixed=True, share_prompts=True)
    assert {m.packed.tokens.shape[1] for m in fixed} == {12}


def test_share_prompts_config_needs_packing_scored_logits_and_sdpa():
    from megatron_meml.config import load_config

    with pytest.raises(ValueError, match=r"share_prompts needs train.max_tokens_per_micro_batch > 0"):
        load_config(None, ["train.share_prompts=true"])
    with pytest.raises(ValueError, match=r"model.layer_spec sdpa \(got te"):
        load_config(None, ["train.share_prompts=true", "train.max_tokens_per_micro_batch=512", "model.layer_spec=te"])
    with pytest.raises(ValueError, match=r"train.logits_at_scored_only true"):
        load_config(None, ["train.share_prompts=true", "train.max_tokens_per_micro_batch=512",
                           "train.logits_at_scored_only=false"])
    cfg = load_config(None, ["train.share_prompts=true", "train.max_tokens_per_micro_batch=512"])
    assert cfg.train.share_prompts
