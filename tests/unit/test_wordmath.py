"""The word-arithmetic family: every gold solution's arithmetic is right, levels mix exactly, splits are disjoint
and deterministic, and the verifier accepts the gold answer line."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from megatron_meml.data import DataConfig
from megatron_meml.data.loaders import load_problems, load_splits
from megatron_meml.data.wordmath import LEVELS, STEPS, generate_problems, make_problem
from megatron_meml.rewards.extract import format_answer
from megatron_meml.rewards.score import score_strict

_EQ = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_gold_solutions_are_right(level):
    rng = random.Random(level)
    for i in range(200):
        p = make_problem(level, rng, f"p{i}")
        eqs = _EQ.findall(p.solution)
        assert len(eqs) == STEPS[level], p.solution
        for a, op, b, c in eqs:
            assert _OPS[op](int(a), int(b)) == int(c), p.solution
        assert eqs[-1][3] == p.answer and int(p.answer) > 0
        assert all(n in p.question for n in re.findall(r"\d+", p.question))
        # every number of the question is used by the solution, so the solution is about this question
        used = {x for a, _, b, _ in eqs for x in (a, b)}
        assert set(re.findall(r"\d+", p.question)) <= used, (p.question, p.solution)


def test_hand_worked_level5():
    class Fixed(random.Random):
        def __init__(self):
            super().__init__(0)
            self.ints = [20, 7, 4]

        def randint(self, a, b):  # noqa: ARG002
            return self.ints.pop(0)

        def choice(self, seq):
            return seq[0]

    p = make_problem(5, Fixed(), "x")
    assert p.question == ("Mia has 20 apples. She buys 7 more and then gives 4 to a friend. "
                          "How many apples does Mia have now?")
    assert p.solution == "After buying 7 more, Mia has 20 + 7 = 27 apples. After giving away 4, she has 27 - 4 = 23 apples."
    assert p.answer == "23"


def test_verifier_accepts_gold_and_rejects_off_by_one():
    for p in generate_problems([1, 5, 7], [1, 1, 1], 60, seed=0):
        assert score_strict(p, f"{p.solution}\n{format_answer(p.answer, 'the_answer_is')}", "the_answer_is").reward == 1.0
        wrong = format_answer(str(int(p.answer) + 1), "the_answer_is")
        assert score_strict(p, f"{p.solution}\n{wrong}", "the_answer_is").reward == 0.0


def test_mixture_unique_and_deterministic():
    a = generate_problems([1, 3, 6], [0.5, 0.3, 0.2], 100, seed=3)
    assert Counter(p.meta["level"] for p in a) == {1: 50, 3: 30, 6: 20}
    assert len({p.question for p in a}) == 100
    assert a == generate_problems([1, 3, 6], [0.5, 0.3, 0.2], 100, seed=3)
    assert [p.question for p in a] != [p.question for p in generate_problems([1, 3, 6], [0.5, 0.3, 0.2], 100, seed=4)]


def test_splits_disjoint_and_sized():
    cfg = DataConfig(source="wordmath", synthetic_levels=[1, 2], synthetic_weights=[1.0, 1.0], synthetic_size=300,
                     val_fraction=0.2)
    train, val = load_splits(cfg, seed=1)
    assert (len(train), len(val)) == (240, 60)
    assert not {p.question for p in train} & {p.question for p in val}
    assert {p.id.split("/")[1] for p in train} == {"train"} and {p.id.split("/")[1] for p in val} == {"validation"}
    assert load_problems("wordmath", config=cfg, seed=1)[0].source == "wordmath"


def test_ids_name_the_question():
    """The same position under another level mix is another question, and so another id (a trace file written for
    one mix must not join to the other's problems)."""
    a = generate_problems([1, 2], [1.0, 1.0], 50, seed=0)
    b = generate_problems([3, 4], [1.0, 1.0], 50, seed=0)
    assert all(p.id.startswith(f"wordmath/train/{i}-") for i, p in enumerate(a))
    assert not {p.id for p in a} & {p.id for p in b}
    assert [p.id for p in a] == [p.id for p in generate_problems([1, 2], [1.0, 1.0], 50, seed=0)]


def test_bad_levels_and_exhaustion():
    with pytest.raises(ValueError, match="1..7, got \\[9\\]"):
        generate_problems([9], [1.0], 10, seed=0)
    # level 1 has 12 names x 10 things x 8 x 8 numbers = 7,680 distinct questions; ask for more than exist
    with pytest.raises(ValueError, match="level 1: could not draw a new distinct question"):
        generate_problems([1], [1.0], 7700, seed=0)
