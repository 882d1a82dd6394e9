"""Rollouts generated ahead of the trainer: asynchronous, off-policy by ``rollout.max_staleness`` = N >= 1 steps.

At step t the loop takes the batch generated for t, then submits the batch of step t + N to the engine, which
generates it (by the weights of step t's start) while step t trains. Before the weight sync the loop collects it,
so nothing is in flight between steps: the sync never races a generation, an evaluation finds the engine idle,
and a checkpoint stores the batches already generated for the next N steps (``state_dict``). A resumed run trains
on exactly those, so no prompt is lost or repeated and the run continues as an uninterrupted one would.

The first step of a run has nothing ahead: it generates its own batch on-policy and fills the queue.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_meml.types import Completion, ExpertGroup, Problem


@dataclass(kw_only=True)
class AheadBatch:
    """The batch of one future step: scored groups once collected, or still in the engine."""

    step: int
    expanded: list[tuple[Problem, int, list[int]]] = field(default_factory=list)
    """(problem, expert index, prompt ids) per group, as ``ExpertSet.expand`` gives them: needed only while the
    batch is in the engine (scoring reads it on collection), so a batch restored from a checkpoint has none."""
    groups: Optional[list[ExpertGroup]] = None
    """Scored groups ([problems x K]) once collected."""
    seconds: float = 0.0
    """The engine's generation seconds."""


class RolloutsAhead:
    """The batches of the next ``max_staleness`` steps, keyed by the step that trains on them."""

    def __init__(self, max_staleness: int):
        if max_staleness < 1:
            raise ValueError(f"RolloutsAhead needs max_staleness >= 1, got {max_staleness}")
        self.max_staleness = max_staleness
        self.ready: dict[int, AheadBatch] = {}
        self.in_flight: Optional[AheadBatch] = None

    def take(self, step: int) -> Optional[AheadBatch]:
        """The collected batch of ``step`` (removed), or None when none was generated ahead (a run's first step)."""
        if self.in_flight is not None and self.in_flight.step == step:
            raise RuntimeError(f"rollouts ahead: the batch of step {step} is still in flight")
        return self.ready.pop(step, None)

    def missing(self, step: int, last_step: int) -> list[int]:
        """Steps step+1 .. step+N (at most ``last_step``) with no batch yet, in order."""
        have = set(self.ready) | ({self.in_flight.step} if self.in_flight is not None else set())
        return [s for s in range(step + 1, min(step + self.max_staleness, last_step) + 1) if s not in have]

    def add(self, batch: AheadBatch) -> None:
        """A collected batch."""
        if batch.groups is None:
            raise ValueError(f"rollouts ahead: the batch of step {batch.step} has no groups")
        self.ready[batch.step] = batch

    # ------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> list[dict[str, Any]]:
        """The collected batches as JSON-able rows (nothing may be in flight: the loop collects before the sync)."""
        if self.in_flight is not None:
            raise RuntimeError(f"rollouts ahead: checkpoint while the batch of step {self.in_flight.step} is in "
                               "flight")
        return [{"step": b.step, "seconds": b.seconds, "groups": [_group_row(g) for g in b.groups or []]}
                for b in sorted(self.ready.values(), key=lambda b: b.step)]

    def load_state_dict(self, rows: list[dict[str, Any]]) -> None:
        self.ready, self.in_flight = {}, None
        for row in rows:
            self.ready[int(row["step"])] = AheadBatch(step=int(row["step"]), seconds=float(row["seconds"]),
                                                      groups=[_group_from_row(g) for g in row["groups"]])


def _group_row(g: ExpertGroup) -> dict[str, Any]:
    return {"problem": dataclasses.asdict(g.problem), "expert": g.expert, "rewards": list(g.rewards),
            "completions": [dataclasses.asdict(c) for c in g.completions]}


def _group_from_row(row: dict[str, Any]) -> ExpertGroup:
    p = dict(row["problem"])
    p["options"] = tuple(tuple(o) for o in p.get("options", ()))
    return ExpertGroup(problem=Problem(**p), expert=int(row["expert"]), rewards=[float(r) for r in row["rewards"]],
                       completions=[Completion(**c) for c in row["completions"]])
