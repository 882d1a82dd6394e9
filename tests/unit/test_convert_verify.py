"""verify's figures against hand-worked numbers, and the small pieces around it (no Megatron processes)."""
from __future__ import annotations

import math

import pytest
import torch

from checkpoints_convert import ConvertError
from checkpoints_convert.launch import run_ranks
from checkpoints_convert.verify import VerifyConfig, compare, token_ids


def test_compare_hand_worked():
    hf = [torch.tensor([[0.0, 0.0, -1e9], [2.0, 0.0, 0.0]])]
    meg = [torch.tensor([[math.log(3.0), 0.0, -1e9], [2.0, 0.0, 2.2]])]
    r = compare(hf, meg, tol=2.0)
    # row 0: p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); row 1: plain softmax
    p = torch.tensor([2.0, 0.0, 0.0]).softmax(0)
    q = torch.tensor([2.0, 0.0, 2.2]).softmax(0)
    kl1 = (p * (p.log() - q.log())).sum().item()
    assert r.mean_kl == pytest.approx((0.5 * math.log(4 / 3) + kl1) / 2, rel=1e-6)
    assert r.max_abs_diff == pytest.approx(2.2)
    assert r.greedy_agreement == 0.5  # row 0: both pick token 0; row 1: token 0 vs token 2
    assert r.tokens == 2 and not r.passed


def test_random_ids_are_seeded_and_prompts_need_a_file(tmp_path):
    cfg = VerifyConfig(hf=str(tmp_path), megatron=str(tmp_path), seq_len=5, num_random=2)
    a, b = token_ids(cfg, 50), token_ids(cfg, 50)
    assert [x.shape for x in a] == [(1, 5), (1, 5)] and all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ConvertError, match="does not exist"):
        token_ids(VerifyConfig(hf=str(tmp_path), megatron=str(tmp_path), prompts=str(tmp_path / "no.txt")), 50)
    with pytest.raises(ValueError, match="dtype"):
        VerifyConfig(hf="a", megatron="b", dtype="fp8")


def _fails_on_rank_1(x):
    import os

    if os.environ["RANK"] == "1":
        raise ConvertError(f"bad thing {x}")
    return int(os.environ["RANK"]) + x


def test_run_ranks_reports_a_failing_rank():
    assert run_ranks(_fails_on_rank_1, 1, 10) == [10]
    with pytest.raises(ConvertError, match="rank 1: bad thing 3"):
        run_ranks(_fails_on_rank_1, 2, 3)
