"""Hard-example store at DP=2 on CPU (gloo): one global view on every rank, an even SFT split, DP-independent state."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_meml.hard_examples import HardExampleConfig, HardExampleStore
from megatron_meml.hard_examples import persist
from megatron_meml.types import ExpertGroup, Problem
from tests.dist import run_distributed

CFG = HardExampleConfig(k_wrong=6, capacity=8, max_replays=2)  # admission probability 6/8
SEED = 3
STEPS = 6


def _groups(step: int) -> list[ExpertGroup]:
    """All ranks' groups of one step; each rank rolls out every world-th of them."""
    out = []
    for i in range(12):
        pid = f"q{(step * 5 + i) % 17}"
        wrong = (8, 7, 8, 3)[(step + i) % 4]
        problem = Problem(id=pid, question=f"Question {pid}", answer="1", solution=f"Solution {pid}")
        out.append(ExpertGroup(problem=problem, expert=i % 2, completions=[],
                               rewards=[0.0] * wrong + [1.0] * (8 - wrong)))
    return out


def _run(store: HardExampleStore, step: int, groups: list[ExpertGroup], rank: int, world: int):
    store.update(groups, step)
    batch = store.sft_batch(rank, world)
    if store.sft_due:
        store.record_replay()
    return batch


def _body(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    store = HardExampleStore(CFG, Path(tmp) / "store", seed=SEED, group=group)
    states, batches, due_steps = [], [], 0
    for step in range(STEPS):
        batch = _run(store, step, _groups(step)[rank::world], rank, world)
        views = [None] * world
        dist.all_gather_object(views, store.state_dict(), group=group)
        assert all(v == views[0] for v in views), f"step {step}: ranks disagree on the store"
        shares = [None] * world
        dist.all_gather_object(shares, [e.key for e in batch], group=group)
        if batch:
            due_steps += 1
            assert [len(s) for s in shares] == [CFG.capacity // world] * world
            flat = [k for s in shares for k in s]
            assert len(set(flat)) == len(flat) == CFG.capacity
        else:
            assert shares == [[]] * world
        assert store.commit() == step + 1
        states.append(store.state_dict())
        batches.append([list(k) for s in shares for k in s])
    assert due_steps >= 2, "the sequence never filled the store; the split was not exercised"
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps({"states": states, "batches": batches}))


@pytest.mark.distributed
def test_two_ranks_share_one_view_and_split_evenly(tmp_path):
    run_distributed(_body, 2, str(tmp_path))
    reference = HardExampleStore(CFG, None, seed=SEED)
    expected = {"states": [], "batches": []}
    for step in range(STEPS):
        batch = _run(reference, step, _groups(step), 0, 1)
        expected["states"].append(json.loads(json.dumps(reference.state_dict())))
        expected["batches"].append([list(e.key) for e in batch])
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == expected, f"rank {rank}: the DP=2 store or SFT batches differ from the DP=1 run"
    body = persist.read_manifest(tmp_path / "store")
    assert [s["file"] for s in body["shards"]] == [persist.shard_name(STEPS, r) for r in range(2)]
    reopened = HardExampleStore(CFG, tmp_path / "store", seed=SEED)
    assert reopened.state_dict() == reference.state_dict()
