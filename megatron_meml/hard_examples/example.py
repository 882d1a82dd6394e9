"""One hard example, its JSON row form, and the seeded hash that replaces a random number generator.

Randomness is a hash of (seed, purpose, step, problem id, expert): the same decision comes out whichever rank
sees the group, in whatever order, under any data-parallel layout.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from megatron_meml.types import ExpertGroup, Problem

Key = tuple[str, int]
"""(problem id, expert id): the dedup key of the store."""


def uniform(seed: int, purpose: str, step: int, problem_id: str, expert: int) -> float:
    """A uniform number in [0, 1) fixed by its arguments (64 bits of blake2b)."""
    text = f"{seed}\x1f{purpose}\x1f{step}\x1f{problem_id}\x1f{expert}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") / 2.0**64


@dataclass(frozen=True, kw_only=True)
class HardExample:
    """A (problem, expert) on which the expert was hard-wrong; SFT target = the gold solution."""

    problem_id: str
    """Problem.id."""
    expert: int
    """Expert index whose prompt P_i the SFT row is conditioned on."""
    question: str
    """Problem.question."""
    solution: str
    """Problem.solution: gold reasoning text (may be empty; then the SFT target is the answer)."""
    answer: str
    """Problem.answer: canonical gold answer."""
    kind: str = "math"
    """Problem.kind: math | choice | bool."""
    options: tuple[tuple[str, str], ...] = ()
    """Problem.options (choice problems)."""
    source: str = ""
    """Problem.source."""
    admitted_step: int
    """RIEL step at which it was admitted (-1: inherited through seed_from)."""
    wrong: int
    """Wrong answers of the expert's G at admission."""
    group_size: int
    """G of the admitting group."""
    replays: int = 0
    """SFT replays so far."""

    @property
    def key(self) -> Key:
        return (self.problem_id, self.expert)

    @property
    def target(self) -> str:
        """The SFT target text: the gold solution, or the answer when the problem has no solution text."""
        return self.solution or self.answer

    def to_problem(self) -> Problem:
        """The Problem to render the SFT prompt (or to roll out again)."""
        return Problem(id=self.problem_id, question=self.question, answer=self.answer, solution=self.solution,
                       kind=self.kind, options=self.options, source=self.source)

    @classmethod
    def from_group(cls, group: ExpertGroup, step: int) -> "HardExample":
        p = group.problem
        return cls(problem_id=p.id, expert=int(group.expert), question=p.question, solution=p.solution,
                   answer=p.answer, kind=p.kind, options=tuple(tuple(o) for o in p.options), source=p.source,
                   admitted_step=step, wrong=group.num_wrong, group_size=len(group.rewards))

    def to_json(self) -> dict[str, Any]:
        return {"problem_id": self.problem_id, "expert": self.expert, "question": self.question,
                "solution": self.solution, "answer": self.answer, "kind": self.kind,
                "options": [list(o) for o in self.options], "source": self.source,
                "admitted_step": self.admitted_step, "wrong": self.wrong, "group_size": self.group_size,
                "replays": self.replays}

    @classmethod
    def from_json(cls, row: Any, where: str) -> "HardExample":
        """Parse one stored row; ``where`` (file:line) names the row in the error."""
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a hard-example row must be a JSON object, got {type(row).__name__}")
        missing = sorted({"problem_id", "expert", "question", "answer", "admitted_step", "wrong",
                          "group_size"} - set(row))
        if missing:
            raise ValueError(f"{where}: hard-example row lacks key(s) {', '.join(missing)}")
        try:
            return cls(problem_id=str(row["problem_id"]), expert=int(row["expert"]), question=row["question"],
                       solution=row.get("solution", ""), answer=row["answer"], kind=row.get("kind", "math"),
                       options=tuple((str(a), str(b)) for a, b in row.get("options", [])),
                       source=row.get("source", ""), admitted_step=int(row["admitted_step"]),
                       wrong=int(row["wrong"]), group_size=int(row["group_size"]),
                       replays=int(row.get("replays", 0)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad hard-example row: {exc}") from exc
