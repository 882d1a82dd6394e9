"""The word-arithmetic family: every gold solution's arithmetic is right, levels mix exactly, splits are disjoint
and deterministic, and the verifier accepts the gold answer line."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from megatron_meml.data import DataConfig, DataError
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


class Fixed(random.Random):
    """Draws the given integers in order and always the first choice (Mia, apples, boxes, a friend)."""

    def __init__(self, *ints: int):
        super().__init__(0)
        self.ints = list(ints)

    def randint(self, a, b):  # noqa: ARG002
        return self.ints.pop(0)

    def choice(self, seq):
        return seq[0]


def test_hand_worked_level5():
    p = make_problem(5, Fixed(20, 7, 4), "x")
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
    splits = load_splits(cfg, seed=1)
    train, val = splits.train, splits.test
    assert (len(train), len(val)) == (240, 60)
    assert not {p.question for p in train} & {p.question for p in val}
    assert {p.id.split("/")[1] for p in train} == {"train"} and {p.id.split("/")[1] for p in val} == {"validation"}
    assert load_problems("wordmath", config=cfg, seed=1)[0].source == "wordmath"


def test_dev_split_is_apart_from_train_and_test_and_deterministic():
    """data.dev_size draws validation problems of the held-out levels from their own stream: no question text in
    two splits, the same problems on every call, and the test problems exactly as without a dev split."""
    kw = dict(source="wordmath", synthetic_levels=[1, 2, 3, 4], synthetic_weights=[1.0] * 4, synthetic_size=400,
              val_fraction=0.25, eval_levels=[5, 6, 7])
    plain, with_dev = load_splits(DataConfig(**kw), seed=3), load_splits(DataConfig(**kw, dev_size=60), seed=3)
    assert plain.dev == [] and len(with_dev.dev) == 60 and len(with_dev.test) == 100
    assert len(with_dev.train) == 400 - 100 - 60
    texts = [{p.question for p in part} for part in (with_dev.train, with_dev.test, with_dev.dev)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert Counter(p.meta["level"] for p in with_dev.dev) == {5: 20, 6: 20, 7: 20}
    assert {p.id.split("/")[1] for p in with_dev.dev} == {"dev"}
    assert with_dev.test == plain.test  # adding a dev split leaves the test problems alone
    assert load_splits(DataConfig(**kw, dev_size=60), seed=3) == with_dev
    assert [p.question for p in load_splits(DataConfig(**kw, dev_size=60), seed=4).dev] != [
        p.question for p in with_dev.dev]
    with pytest.raises(DataError, match="data.dev_size=300"):
        load_splits(DataConfig(**kw, dev_size=300), seed=3)


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


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_style_is_right_and_ends_on_the_answer(level):
    """Each style's worked solution: every calculation in it is right, r1's check after each step is that step's
    inverse, the last step's result is the answer, the expert set's answer line after it verifies, and the style is
    recognisable."""
    from megatron_meml.data.wordmath import STYLES, detect_style

    eq = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
    ops = {**_OPS, "/": lambda a, b: a / b}
    inverse = {"+": "-", "-": "+", "*": "/"}
    rng = random.Random(100 + level)
    for i in range(100):
        p = make_problem(level, rng, f"p{i}")
        assert set(p.meta["solutions"]) == set(STYLES) and p.meta["solutions"]["plain"] == p.solution
        for style, text in p.meta["solutions"].items():
            eqs = eq.findall(text)
            assert all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in eqs), text
            steps = eqs
            if style == "r1":
                steps = []
                for line in (x for x in text.splitlines() if x.startswith("Step ")):
                    (a, op, b, c), (c2, op2, b2, a2) = eq.findall(line)
                    assert (c2, op2, b2, a2) == (c, inverse[op], b, a), line
                    steps.append((a, op, b, c))
            assert len(steps) == STEPS[level] and steps[-1][3] == p.answer, (style, text)
            assert detect_style(text) == style, text
            gold = f"{text}\n{format_answer(p.answer, 'the_answer_is')}"
            assert score_strict(p, gold, "the_answer_is").reward == 1.0


def test_hand_worked_styles_level6():
    sol = make_problem(6, Fixed(3, 4, 5), "x").meta["solutions"]
    assert sol["r1"] == ("We need the apples Mia has altogether.\n"
                         "Step 1: 3 * 4 = 12 in the boxes. Check: 12 / 4 = 3.\n"
                         "Step 2: 12 + 5 = 17 with the 5 loose ones. Check: 17 - 5 = 12.")
    assert sol["plan"] == ("Plan: the apples in the boxes, then with the 5 loose ones.\n"
                           "Q1: 3 * 4 = 12.\nQ2: 12 + 5 = 17.\n"
                           "Conclusion: the apples Mia has altogether: 17.")
