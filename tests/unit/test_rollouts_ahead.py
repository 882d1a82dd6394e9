"""RolloutsAhead: which steps to generate ahead, and the checkpoint round trip of the batches already generated
(exact: the resumed run trains on the same completions, log-probs and rewards)."""
from __future__ import annotations

import json

import pytest

from megatron_meml.rollout.ahead import AheadBatch, RolloutsAhead
from megatron_meml.training.checkpoint import AHEAD_DIR, CheckpointError, load_ahead
from megatron_meml.types import Completion, ExpertGroup, Problem


def _batch(step: int) -> AheadBatch:
    p = Problem(id=f"q{step}", question="Pick one.", answer="B", solution="It is B.", kind="choice",
                options=(("A", "1"), ("B", "2")), source="synthetic", meta={"level": 3, "styles": {"a": "x"}})
    comps = [Completion(prompt_ids=[1, 2, 3], token_ids=[4, 5], text="The answer is B.",
                        logprobs=[-0.1234567890123, -1e-9], finish_reason="stop", policy_version=step - 2),
             Completion(prompt_ids=[1, 2, 3], token_ids=[6], text="A", logprobs=[-2.5], finish_reason="length",
                        policy_version=step - 2)]
    g = ExpertGroup(problem=p, expert=1, completions=comps, rewards=[1.0, 0.0])
    return AheadBatch(step=step, expanded=[(p, 1, [1, 2, 3])], groups=[g], seconds=0.75)


def test_missing_steps_are_the_next_n_not_yet_generated():
    ahead = RolloutsAhead(2)
    assert ahead.missing(1, last_step=10) == [2, 3]
    ahead.add(_batch(2))
    ahead.in_flight = AheadBatch(step=3, expanded=[])
    assert ahead.missing(1, last_step=10) == []
    assert ahead.missing(2, last_step=10) == [4]
    assert ahead.missing(9, last_step=10) == [10]
    assert ahead.missing(10, last_step=10) == []


def test_take_returns_each_batch_once_and_refuses_one_in_flight():
    ahead = RolloutsAhead(1)
    assert ahead.take(1) is None  # a run's first step: nothing generated ahead
    ahead.add(_batch(2))
    assert ahead.take(2).step == 2
    assert ahead.take(2) is None
    ahead.in_flight = AheadBatch(step=3, expanded=[])
    with pytest.raises(RuntimeError, match="step 3 is still in flight"):
        ahead.take(3)
    with pytest.raises(RuntimeError, match="in flight"):
        ahead.state_dict()
    with pytest.raises(ValueError, match="has no groups"):
        ahead.add(AheadBatch(step=4, expanded=[]))
    with pytest.raises(ValueError, match="max_staleness >= 1"):
        RolloutsAhead(0)


def test_state_round_trip_is_exact_through_json(tmp_path):
    ahead = RolloutsAhead(2)
    ahead.add(_batch(3))
    ahead.add(_batch(2))
    rows = json.loads(json.dumps(ahead.state_dict()))
    assert [r["step"] for r in rows] == [2, 3]
    back = RolloutsAhead(2)
    back.load_state_dict(rows)
    for step in (2, 3):
        a, b = _batch(step), back.take(step)
        assert b.groups == a.groups and b.seconds == a.seconds
        assert b.expanded == []  # only an in-flight batch needs it
    assert back.take(2) is None


def test_load_ahead_names_a_missing_rank_file(tmp_path):
    assert load_ahead(tmp_path, 0) == []  # an on-policy checkpoint
    (tmp_path / AHEAD_DIR).mkdir()
    (tmp_path / AHEAD_DIR / "rank00000.json").write_text("[]")
    assert load_ahead(tmp_path, 0) == []
    with pytest.raises(CheckpointError, match="none for rank 1"):
        load_ahead(tmp_path, 1)
