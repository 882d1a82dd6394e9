"""reduce_across_ranks at 2 gloo ranks: every namespace's rule from REDUCTIONS against hand-worked numbers."""
from __future__ import annotations

import pytest

from tests.dist import run_distributed

RANK_METRICS = [
    {"rollout/num_samples": 8, "rollout/response_len": 10.0, "reward/mean": 0.25, "expert/0/reward_mean": 0.5,
     "hard/size": 7, "timing/rollout": 1.0, "weight_sync/bytes": 100, "weight_sync/seconds": 0.5,
     "eval/num_problems": 50, "eval/gsm8k/0/accuracy": 0.5, "train/mismatch_abs": 0.1},
    {"rollout/num_samples": 8, "rollout/response_len": 20.0, "reward/mean": 0.75, "expert/0/reward_mean": 0.0,
     "hard/size": 9, "timing/rollout": 3.0, "weight_sync/bytes": 100, "weight_sync/seconds": 0.25,
     "eval/num_problems": 50, "eval/gsm8k/0/accuracy": 0.7, "train/mismatch_abs": 0.3,
     "expert/1/reward_mean": 0.4},  # only rank 1 has it: the mean is over the ranks that do
]
EXPECTED = {"rollout/num_samples": 16.0, "rollout/response_len": 15.0, "reward/mean": 0.5,
            "expert/0/reward_mean": 0.25, "expert/1/reward_mean": 0.4, "hard/size": 9.0, "timing/rollout": 3.0,
            "weight_sync/bytes": 200.0, "weight_sync/seconds": 0.5, "eval/num_problems": 100.0,
            "eval/gsm8k/0/accuracy": 0.6, "train/mismatch_abs": 0.2}


def _body(rank: int, world: int) -> None:
    from megatron_meml.reporting.metrics import reduce_across_ranks

    got = reduce_across_ranks(RANK_METRICS[rank])
    assert sorted(got) == sorted(EXPECTED), sorted(got)
    for k, v in EXPECTED.items():
        assert got[k] == pytest.approx(v, abs=1e-12), (k, got[k], v)
    # a key without a rule on one rank raises on every rank (none is left waiting in a collective)
    bad = dict(RANK_METRICS[rank], **({"bogus/x": 1.0} if rank == 1 else {}))
    with pytest.raises(KeyError, match="'bogus/x' has no reduction rule"):
        reduce_across_ranks(bad)


@pytest.mark.distributed
def test_reduce_across_two_ranks():
    run_distributed(_body, 2, timeout_s=120)
