"""Dynamic sampling (algo/dynamic_sampling.py) and the soft overlong penalty (rewards/shaping.py), hand-worked."""
from __future__ import annotations

import pytest

from megatron_meml.algo.dynamic_sampling import DynamicSamplingExhausted, collect, informative, question_groups
from megatron_meml.rewards.shaping import overlong_penalty
from megatron_meml.types import ExpertGroup, Problem


def _q(qid: str, *rewards: list[float]) -> list[ExpertGroup]:
    """One question's K groups with the given rewards (expert k gets rewards[k])."""
    p = Problem(id=qid, question=qid, answer="1")
    return [ExpertGroup(problem=p, expert=k, completions=[], rewards=list(r)) for k, r in enumerate(rewards)]


def test_the_unit_is_the_question_with_its_experts():
    assert not informative(_q("a", [0, 0], [0, 0]))
    assert not informative(_q("b", [1, 1], [1, 1]))
    assert informative(_q("c", [1, 1], [0, 0]))  # every group all-equal, yet expert 0 can teach expert 1
    assert informative(_q("d", [0, 1], [0, 0]))
    groups = _q("a", [0], [0]) + _q("b", [1], [0])
    assert [[g.problem.id for g in q] for q in question_groups(groups, 2)] == [["a", "a"], ["b", "b"]]
    with pytest.raises(ValueError, match="not a whole number of questions"):
        question_groups(groups[:3], 2)


def _batches(*batches):
    """draw(j) returns batches[j] and records the calls."""
    calls = []

    def draw(j):
        calls.append(j)
        return batches[j]

    return draw, calls


def test_refill_until_the_batch_is_full():
    b0 = _q("a", [0, 0], [0, 0]) + _q("b", [1, 0], [0, 0])          # 1 of 2 informative
    b1 = _q("c", [1, 1], [1, 1]) + _q("d", [1, 1], [0, 0])          # 1 of 2 (d: across experts)
    b2 = _q("e", [0, 1], [1, 1]) + _q("f", [0, 0], [0, 0])
    draw, calls = _batches(b0, b1, b2)
    out = collect(b0, draw, num_experts=2, wanted=2, max_gen_batches=3, on_exhausted="error")
    assert calls == [1]
    assert [g.problem.id for g in out.kept] == ["b", "b", "d", "d"]
    assert [g.problem.id for g in out.generated] == ["a", "a", "b", "b", "c", "c", "d", "d"]  # pairs/store see all
    assert (out.gen_batches, out.filtered, out.shortfall, out.surplus) == (2, 2, 0, [])
    assert out.metrics() == {"rollout/gen_batches": 2.0, "rollout/filtered_groups": 2.0, "rollout/ds_shortfall": 0.0,
                             "rollout/informative_questions": 2.0}


def test_surplus_informative_questions_are_not_trained_on():
    b0 = _q("a", [0, 1]) + _q("b", [1, 0]) + _q("c", [0, 1])
    draw, calls = _batches(b0)
    out = collect(b0, draw, num_experts=1, wanted=2, max_gen_batches=3, on_exhausted="train")
    assert calls == [] and [g.problem.id for g in out.kept] == ["a", "b"]
    assert [g.problem.id for g in out.surplus] == ["c"] and out.gen_batches == 1


def test_budget_spent_train_or_error():
    dead = _q("a", [0, 0]) + _q("b", [0, 0])
    live = _q("c", [0, 1]) + _q("d", [0, 0])
    draw, calls = _batches(dead, live, dead)
    out = collect(dead, draw, num_experts=1, wanted=2, max_gen_batches=3, on_exhausted="train")
    assert calls == [1, 2] and [g.problem.id for g in out.kept] == ["c"]
    assert (out.gen_batches, out.filtered, out.shortfall) == (3, 5, 1)
    draw, _ = _batches(dead, dead)
    with pytest.raises(DynamicSamplingExhausted, match=r"0 of 2 questions had informative rewards after 2 "
                                                       r"generation batches \(algo.dynamic_sampling_max_gen_batches=2\)"):
        collect(dead, draw, num_experts=1, wanted=2, max_gen_batches=2, on_exhausted="error")
    draw, calls = _batches(dead)
    out = collect(dead, draw, num_experts=1, wanted=2, max_gen_batches=1, on_exhausted="train")
    assert calls == [] and out.kept == [] and out.shortfall == 2


def test_overlong_penalty_hand_worked():
    # L_max 100, buffer 20: free up to 80, then -1/20 per token, -1 at 100 and beyond
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(81, 100, 20) == pytest.approx(-0.05)
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(130, 100, 20) == -1.0
    assert overlong_penalty(95, 100, 20, factor=0.5) == pytest.approx(-0.375)
    assert overlong_penalty(100, 100, 0) == 0.0  # off
    with pytest.raises(ValueError, match="longer than the maximum length"):
        overlong_penalty(10, 100, 101)


def test_configs_name_their_fields():
    from megatron_meml.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="dynamic_sampling_on_exhausted must be one of"):
        load_config(None, ["algo.dynamic_sampling_on_exhausted=skip"])
    with pytest.raises(ConfigError, match="dynamic_sampling_max_gen_batches must be >= 1"):
        load_config(None, ["algo.dynamic_sampling_max_gen_batches=0"])
    with pytest.raises(ConfigError, match="reward.overlong_buffer=300 is longer than rollout.max_new_tokens=256"):
        load_config(None, ["reward.overlong_buffer=300", "rollout.max_new_tokens=256"])
