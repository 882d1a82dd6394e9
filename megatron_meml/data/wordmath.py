"""The word-arithmetic family: short natural-language problems for real tokenizers, in graded levels.

Each level is a problem template with its number ranges; every problem carries a gold worked solution in plain
sentences (``Problem.solution``; the expert set appends the answer line in the configured format). Levels grow by
the size of the numbers and the number of steps:

===== ===================================================== =================================
level what                                                  numbers
===== ===================================================== =================================
1     one addition                                          2-9 and 2-9
2     one subtraction                                       12-29 minus 2-9
3     one addition of two-digit numbers                     11-49 and 11-49
4     one multiplication (groups of equal size)             2-9 groups of 2-9
5     two steps: add, then take away                        10-30, then 2-9 and 2-9
6     two steps: equal groups, then add more                2-9 x 2-9, then 2-19
7     three steps: equal groups, add, then take away        2-9 x 2-9, then 2-19, then 2-9
===== ===================================================== =================================

The levels' difficulty for SmolLM2-135M-Instruct is measured in docs/real_model.md (``bench/wordmath_levels.py``).
Everything is a pure function of (levels, weights, size, seed, split); question texts are unique within a split, and
ids (``wordmath/<split>/<index>-<hash of the question>``) name the text, not only the position.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Callable, Sequence

from megatron_meml.data.synthetic import level_counts
from megatron_meml.types import Problem

NAMES = (("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
         ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Ravi", "he", "his"),
         ("Sofia", "she", "her"), ("Ben", "he", "his"), ("Yuki", "she", "her"), ("Diego", "he", "his"))
THINGS = ("apples", "marbles", "stickers", "pencils", "stamps", "cookies", "books", "shells", "coins", "cards")
CONTAINERS = ("boxes", "bags", "jars", "baskets", "packs", "rows")
MAX_LEVEL = 7
_MAX_TRIES = 200


def _pick(rng: random.Random) -> tuple[str, str, str, str]:
    name, he, his = rng.choice(NAMES)
    return name, he, his, rng.choice(THINGS)


def _level1(rng: random.Random) -> tuple[str, str, int]:
    name, he, _, thing = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {a} {thing}. {he.capitalize()} gets {b} more {thing}. How many {thing} does {name} have now?"
    return q, f"{name} starts with {a} {thing} and gets {b} more, so {he} has {a} + {b} = {a + b} {thing}.", a + b


def _level2(rng: random.Random) -> tuple[str, str, int]:
    name, he, _, thing = _pick(rng)
    a, b = rng.randint(12, 29), rng.randint(2, 9)
    q = f"{name} has {a} {thing}. {he.capitalize()} gives {b} of them to a friend. How many {thing} does {name} " \
        f"have left?"
    return q, f"{name} starts with {a} {thing} and gives away {b}, so {he} has {a} - {b} = {a - b} {thing} left.", \
        a - b


def _level3(rng: random.Random) -> tuple[str, str, int]:
    name, he, _, thing = _pick(rng)
    a, b = rng.randint(11, 49), rng.randint(11, 49)
    q = f"{name} collected {a} {thing} on Monday and {b} {thing} on Tuesday. How many {thing} did {name} collect " \
        f"in total?"
    return q, f"{name} collected {a} + {b} = {a + b} {thing} over the two days.", a + b


def _level4(rng: random.Random) -> tuple[str, str, int]:
    name, _, his, thing = _pick(rng)
    box = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {a} {box} of {thing}. Each of {his} {box} holds {b} {thing}. How many {thing} does {name} have?"
    return q, f"{a} {box} with {b} {thing} each make {a} * {b} = {a * b} {thing}.", a * b


def _level5(rng: random.Random) -> tuple[str, str, int]:
    name, he, _, thing = _pick(rng)
    a, b, c = rng.randint(10, 30), rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {a} {thing}. {he.capitalize()} buys {b} more and then gives {c} to {his_friend(rng)}. " \
        f"How many {thing} does {name} have now?"
    s = f"After buying {b} more, {name} has {a} + {b} = {a + b} {thing}. After giving away {c}, {he} has " \
        f"{a + b} - {c} = {a + b - c} {thing}."
    return q, s, a + b - c


def _level6(rng: random.Random) -> tuple[str, str, int]:
    name, he, his, thing = _pick(rng)
    box = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 19)
    q = f"{name} has {a} {box} with {b} {thing} in each. {he.capitalize()} also finds {c} loose {thing}. " \
        f"How many {thing} does {name} have altogether?"
    s = f"The {box} hold {a} * {b} = {a * b} {thing}. With the {c} loose ones, {name} has {a * b} + {c} = " \
        f"{a * b + c} {thing}."
    return q, s, a * b + c


def _level7(rng: random.Random) -> tuple[str, str, int]:
    name, he, his, thing = _pick(rng)
    box = rng.choice(CONTAINERS)
    a, b, c, d = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 19), rng.randint(2, 9)
    q = f"{name} has {a} {box} with {b} {thing} in each and {c} more {thing} on the table. {he.capitalize()} " \
        f"gives {d} {thing} to {his_friend(rng)}. How many {thing} does {name} have left?"
    s = f"The {box} hold {a} * {b} = {a * b} {thing}. Adding the {c} on the table gives {a * b} + {c} = " \
        f"{a * b + c}. After giving away {d}, {he} has {a * b + c} - {d} = {a * b + c - d} {thing} left."
    return q, s, a * b + c - d


def his_friend(rng: random.Random) -> str:
    """A friend's name for the giving steps."""
    return rng.choice(("a friend", "a cousin", "a neighbour", "a classmate"))


LEVELS: dict[int, Callable[[random.Random], tuple[str, str, int]]] = {
    1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5, 6: _level6, 7: _level7}
STEPS = {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 3}


def _text_id(question: str) -> str:
    """8 hex digits of the question's hash: ids name the text, so a trace or store file written for another level
    mix or seed never joins to a different question that happens to share its position."""
    return hashlib.sha256(question.encode()).hexdigest()[:8]


def make_problem(level: int, rng: random.Random, pid: str) -> Problem:
    """One problem of ``level`` drawn from ``rng``."""
    if level not in LEVELS:
        raise ValueError(f"wordmath level must be one of {sorted(LEVELS)}, got {level}")
    question, solution, answer = LEVELS[level](rng)
    return Problem(id=pid, question=question, answer=str(answer), solution=solution, kind="math",
                   source="wordmath", meta={"level": level, "steps": STEPS[level]})


def generate_problems(levels: Sequence[int], weights: Sequence[float], size: int, *, seed: int,
                      split: str = "train", exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """``size`` problems mixing ``levels`` by ``weights`` (exact counts, shuffled), unique question texts and none
    of the texts in ``exclude``. Raises ValueError when a level has too few distinct problems for its count."""
    bad = [lvl for lvl in levels if lvl not in LEVELS]
    if bad:
        raise ValueError(f"data.synthetic_levels for source wordmath must be in 1..{MAX_LEVEL}, got {bad}")
    rng = random.Random(f"meml-wordmath:{seed}:{split}")
    plan = [lvl for lvl, c in zip(levels, level_counts(weights, size)) for _ in range(c)]
    rng.shuffle(plan)
    seen, out = set(exclude), []
    for i, lvl in enumerate(plan):
        for _ in range(_MAX_TRIES):
            p = make_problem(lvl, rng, f"wordmath/{split}/{i}")
            if p.question not in seen:
                p = dataclasses.replace(p, id=f"{p.id}-{_text_id(p.question)}")
                break
        else:
            raise ValueError(f"wordmath level {lvl}: could not draw a new distinct question after {_MAX_TRIES} "
                             f"tries; lower data.synthetic_size")
        seen.add(p.question)
        out.append(p)
    return out
