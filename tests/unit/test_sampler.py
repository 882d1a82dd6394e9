"""ProblemSampler: epochs are permutations, ranks are disjoint, and a resumed run continues exactly."""
from __future__ import annotations

import pytest

from megatron_meml.data import ProblemSampler


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = ProblemSampler(list(range(10)), seed=0)
    e0, e1 = s.next_batch(10), s.next_batch(10)
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1
    assert s.state_dict()["epoch"] == 2


def test_deterministic_by_seed():
    a = ProblemSampler(list(range(50)), seed=3)
    b = ProblemSampler(list(range(50)), seed=3)
    c = ProblemSampler(list(range(50)), seed=4)
    assert [a.next_batch(7) for _ in range(10)] == [b.next_batch(7) for _ in range(10)]
    assert a.permutation(0) != c.permutation(0)


def test_batches_cross_epoch_boundaries_without_dropping():
    s = ProblemSampler(list(range(5)), seed=1)
    stream = s.next_batch(3) + s.next_batch(3) + s.next_batch(4)
    assert stream == s.permutation(0) + s.permutation(1)
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["offset"] == 0


def test_data_parallel_ranks_are_disjoint_slices_of_the_global_stream():
    items = list(range(23))
    single = ProblemSampler(items, seed=9)
    ranks = [ProblemSampler(items, seed=9, dp_rank=r, dp_size=3) for r in range(3)]
    for _ in range(6):
        global_batch = single.next_batch(12)
        per_rank = [s.next_batch(4) for s in ranks]
        assert sum(per_rank, []) == global_batch
    assert len({str(s.state_dict()) for s in ranks}) == 1


def test_resume_continues_exactly_even_with_another_dp_size():
    items = [f"p{i}" for i in range(17)]
    straight = ProblemSampler(items, seed=5)
    reference = [straight.next_batch(4) for _ in range(9)]
    first = ProblemSampler(items, seed=5)
    got = [first.next_batch(4) for _ in range(4)]
    resumed = ProblemSampler(items, seed=5)
    resumed.load_state_dict(dict(first.state_dict()))
    got += [resumed.next_batch(4) for _ in range(2)]
    assert got == reference[:6]
    halves = [ProblemSampler(items, seed=5, dp_rank=r, dp_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(resumed.state_dict())
    for step in range(6, 9):
        assert halves[0].next_batch(2) + halves[1].next_batch(2) == reference[step]


@pytest.mark.parametrize("state,key", [
    ({"seed": 6, "num_items": 4, "epoch": 0, "offset": 0}, "seed"),
    ({"seed": 5, "num_items": 9, "epoch": 0, "offset": 0}, "num_items"),
    ({"seed": 5, "num_items": 4, "epoch": 0}, "offset"),
    ({"seed": 5, "num_items": 4, "epoch": 0, "offset": 4}, "out of range"),
])
def test_mismatched_state_is_refused(state, key):
    s = ProblemSampler(list(range(4)), seed=5)
    with pytest.raises(ValueError, match=key):
        s.load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dp_rank"):
        ProblemSampler([1], seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="at least one"):
        ProblemSampler([], seed=0)
    with pytest.raises(ValueError, match="n must be"):
        ProblemSampler([1], seed=0).next_batch(0)
