"""The word-arithmetic family: short natural-language problems for real tokenizers, in graded levels.

Each level is a problem template with its number ranges; every problem carries a gold worked solution in plain
sentences (``Problem.solution``; the expert set appends the answer line in the configured format) and the same
calculations in three styles (``Problem.meta["solutions"]``, see ``STYLES``): ``plain`` (those sentences), ``r1``
(restate, one step per line, check each result by its inverse) and ``plan`` (a plan, one sub-question per step, a
conclusion). A recipe gives each expert a style (``experts.styles``): the CPU stand-in for teachers that are always
right and each write in their own way. Levels grow by the size of the numbers and the number of steps:

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
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

from megatron_meml.data.synthetic import level_counts
from megatron_meml.types import Problem

NAMES = (("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
         ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Ravi", "he", "his"),
         ("Sofia", "she", "her"), ("Ben", "he", "his"), ("Yuki", "she", "her"), ("Diego", "he", "his"))
THINGS = ("apples", "marbles", "stickers", "pencils", "stamps", "cookies", "books", "shells", "coins", "cards")
CONTAINERS = ("boxes", "bags", "jars", "baskets", "packs", "rows")
MAX_LEVEL = 7
_MAX_TRIES = 200


@dataclass(frozen=True)
class Step:
    """One calculation of a worked solution: ``a op b``, with what it stands for."""

    what: str
    """A short phrase for what the step computes ("after buying 7 more")."""
    a: int
    op: str
    """+, - or *."""
    b: int

    @property
    def result(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    def equation(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result}"

    def check(self) -> str:
        """The inverse calculation that confirms the step (27 - 7 = 20 for 20 + 7 = 27)."""
        inverse = {"+": "-", "-": "+", "*": "/"}[self.op]
        return f"{self.result} {inverse} {self.b} = {self.a}"


class Worked(NamedTuple):
    """A drawn problem: its question, the plain gold solution, and the structure every style renders."""

    question: str
    solution: str
    """Plain sentences (the ``plain`` style)."""
    asked: str
    """What the question asks for, as a noun phrase ("the apples Mia has now")."""
    unit: str
    steps: tuple[Step, ...]


def render_r1(w: Worked) -> str:
    """What is asked, then one step per line, each checked by its inverse (DeepSeek-R1-like)."""
    lines = [f"We need {w.asked}."]
    lines += [f"Step {i}: {st.equation()} {st.what}. Check: {st.check()}." for i, st in enumerate(w.steps, 1)]
    return "\n".join(lines)


def render_plan(w: Worked) -> str:
    """A plan of sub-questions, one short answer per sub-question, a conclusion (Doubao-1.5-thinking-like)."""
    lines = [f"Plan: the {w.unit} " + ", then ".join(st.what for st in w.steps) + "."]
    lines += [f"Q{i}: {st.equation()}." for i, st in enumerate(w.steps, 1)]
    lines.append(f"Conclusion: {w.asked}: {w.steps[-1].result}.")
    return "\n".join(lines)


STYLES: dict[str, Callable[[Worked], str]] = {"plain": lambda w: w.solution, "r1": render_r1, "plan": render_plan}
"""Gold-work styles (``Problem.meta["solutions"][style]``; ``experts.styles`` maps an expert to one): the same
correct calculations, written three ways."""
_R1 = re.compile(r"^Step 1:.*Check:", re.MULTILINE)
_PLAN = re.compile(r"^Plan:.*\n(?:.*\n)*?Q1:", re.MULTILINE)
_EQUATION = re.compile(r"\d+ [-+*] \d+ = \d+")


def detect_style(text: str) -> Optional[str]:
    """Which style a completion is written in, by its markers: ``r1`` (a "Step 1: ... Check:" line), ``plan`` (a
    "Plan:" line followed by "Q1:"), ``plain`` (an equation and neither marker); None: no worked calculation."""
    if _R1.search(text):
        return "r1"
    if _PLAN.search(text):
        return "plan"
    return "plain" if _EQUATION.search(text) else None


def _pick(rng: random.Random) -> tuple[str, str, str, str]:
    name, he, his = rng.choice(NAMES)
    return name, he, his, rng.choice(THINGS)


def _level1(rng: random.Random) -> Worked:
    name, he, _, thing = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {a} {thing}. {he.capitalize()} gets {b} more {thing}. How many {thing} does {name} have now?"
    return Worked(q, f"{name} starts with {a} {thing} and gets {b} more, so {he} has {a} + {b} = {a + b} {thing}.",
                  f"the {thing} {name} has now", thing, (Step(f"after getting {b} more", a, "+", b),))


def _level2(rng: random.Random) -> Worked:
    name, he, _, thing = _pick(rng)
    a, b = rng.randint(12, 29), rng.randint(2, 9)
    q = f"{name} has {a} {thing}. {he.capitalize()} gives {b} of them to a friend. How many {thing} does {name} " \
        f"have left?"
    return Worked(q, f"{name} starts with {a} {thing} and gives away {b}, so {he} has {a} - {b} = {a - b} {thing} "
                     "left.", f"the {thing} {name} has left", thing, (Step(f"after giving away {b}", a, "-", b),))


def _level3(rng: random.Random) -> Worked:
    name, he, _, thing = _pick(rng)
    a, b = rng.randint(11, 49), rng.randint(11, 49)
    q = f"{name} collected {a} {thing} on Monday and {b} {thing} on Tuesday. How many {thing} did {name} collect " \
        f"in total?"
    return Worked(q, f"{name} collected {a} + {b} = {a + b} {thing} over the two days.",
                  f"the {thing} {name} collected in total", thing, (Step("over Monday and Tuesday", a, "+", b),))


def _level4(rng: random.Random) -> Worked:
    name, _, his, thing = _pick(rng)
    box = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {a} {box} of {thing}. Each of {his} {box} holds {b} {thing}. How many {thing} does {name} have?"
    return Worked(q, f"{a} {box} with {b} {thing} each make {a} * {b} = {a * b} {thing}.",
                  f"the {thing} {name} has", thing, (Step(f"in {a} {box} of {b}", a, "*", b),))


def _level5(rng: random.Random) -> Worked:
    name, he, _, thing = _pick(rng)
    a, b, c = rng.randint(10, 30), rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {a} {thing}. {he.capitalize()} buys {b} more and then gives {c} to {his_friend(rng)}. " \
        f"How many {thing} does {name} have now?"
    s = f"After buying {b} more, {name} has {a} + {b} = {a + b} {thing}. After giving away {c}, {he} has " \
        f"{a + b} - {c} = {a + b - c} {thing}."
    return Worked(q, s, f"the {thing} {name} has now", thing,
                  (Step(f"after buying {b} more", a, "+", b), Step(f"after giving away {c}", a + b, "-", c)))


def _level6(rng: random.Random) -> Worked:
    name, he, his, thing = _pick(rng)
    box = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 19)
    q = f"{name} has {a} {box} with {b} {thing} in each. {he.capitalize()} also finds {c} loose {thing}. " \
        f"How many {thing} does {name} have altogether?"
    s = f"The {box} hold {a} * {b} = {a * b} {thing}. With the {c} loose ones, {name} has {a * b} + {c} = " \
        f"{a * b + c} {thing}."
    return Worked(q, s, f"the {thing} {name} has altogether", thing,
                  (Step(f"in the {box}", a, "*", b), Step(f"with the {c} loose ones", a * b, "+", c)))


def _level7(rng: random.Random) -> Worked:
    name, he, his, thing = _pick(rng)
    box = rng.choice(CONTAINERS)
    a, b, c, d = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 19), rng.randint(2, 9)
    d = min(d, a * b + c - 1)  # never more given away than there is (no extra draw: other problems stay as they were)
    q = f"{name} has {a} {box} with {b} {thing} in each and {c} more {thing} on the table. {he.capitalize()} " \
        f"gives {d} {thing} to {his_friend(rng)}. How many {thing} does {name} have left?"
    s = f"The {box} hold {a} * {b} = {a * b} {thing}. Adding the {c} on the table gives {a * b} + {c} = " \
        f"{a * b + c}. After giving away {d}, {he} has {a * b + c} - {d} = {a * b + c - d} {thing} left."
    return Worked(q, s, f"the {thing} {name} has left", thing,
                  (Step(f"in the {box}", a, "*", b), Step(f"with the {c} on the table", a * b, "+", c),
                   Step(f"after giving away {d}", a * b + c, "-", d)))


def his_friend(rng: random.Random) -> str:
    """A friend's name for the giving steps."""
    return rng.choice(("a friend", "a cousin", "a neighbour", "a classmate"))


LEVELS: dict[int, Callable[[random.Random], Worked]] = {
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
    w = LEVELS[level](rng)
    return Problem(id=pid, question=w.question, answer=str(w.steps[-1].result), solution=w.solution, kind="math",
                   source="wordmath", meta={"level": level, "steps": STEPS[level],
                                            "solutions": {name: render(w) for name, render in STYLES.items()}})


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
