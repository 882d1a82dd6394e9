"""The hard-example store: admission, retirement, SFT draws, a global view across DP ranks, persistence.

One RIEL step, on every data-parallel rank (all calls marked *collective* must be made by every rank of the
group, in the same order)::

    store.update(groups, step)                 # collective: admit / retire from this rank's rollouts
    if store.sft_due:
        rows = store.sft_batch(dp_rank, dp_size)   # this rank's share of the globally drawn batch
        ...train on rows...
        store.record_replay()                   # same bookkeeping on every rank
    store.commit()                              # collective: persist to the store directory

Every rank holds the whole store (it is small: B entries); ``update`` all-gathers each rank's candidate admissions
and solved keys and merges them with rank-independent rules, so all ranks end each step with identical state.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.distributed as dist

from megatron_meml.hard_examples import persist
from megatron_meml.hard_examples.config import HardExampleConfig
from megatron_meml.hard_examples.example import HardExample, Key, uniform
from megatron_meml.types import ExpertGroup

COUNTS = ("admissions", "duplicates", "rejected_full", "retired_solved", "retired_max_replays", "replays")
"""Event counters, reported per step as ``hard/<name>`` and since the store began as ``hard/<name>_total``."""


def _rank_world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _tie_break(example: HardExample) -> str:
    return json.dumps(example.to_json(), sort_keys=True)


class HardExampleStore:
    """Distributed, persistent store of hard (problem, expert) examples.

    ``directory``: where the store lives (``<run_dir>/hard_examples``, on a filesystem all ranks share); it is
    opened if it holds a committed store, else seeded from ``cfg.seed_from`` if set, else starts empty.
    ``None`` keeps the store in memory only. ``seed``: the run seed (fixes admissions and draws).
    ``group``: the data-parallel process group (None: the default group; no collectives when torch.distributed
    is not initialised). Opening is collective.
    """

    def __init__(self, cfg: HardExampleConfig, directory: Optional[str | Path], *, seed: int,
                 group: Any = None) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.group = group
        self.rank, self.world = _rank_world(group)
        if cfg.capacity % self.world:
            raise ValueError(f"hard_examples.capacity ({cfg.capacity}) must be divisible by the data-parallel "
                             f"size ({self.world}) so that the SFT batch splits evenly across ranks")
        self.directory = Path(directory) if directory is not None else None
        self.entries: dict[Key, HardExample] = {}
        self.step = -1
        self.totals = dict.fromkeys(COUNTS, 0)
        self._counts = dict.fromkeys(COUNTS, 0)
        self._replayed_step: Optional[int] = None
        if self.directory is not None:
            self._open(self.directory)

    # ------------------------------------------------------------------------------------------- collectives
    def _gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    # --------------------------------------------------------------------------------------------- admission
    def _admit_prob(self, group_size: int) -> float:
        if self.cfg.admit_prob is not None:
            return self.cfg.admit_prob
        return min(1.0, self.cfg.k_wrong / group_size)

    def _solved(self, wrong: int, size: int) -> bool:
        if self.cfg.retire_min_correct is None:
            return wrong <= self.cfg.k_wrong
        return size - wrong >= self.cfg.retire_min_correct

    def _classify(self, groups: Sequence[ExpertGroup], step: int) -> tuple[list, list[Key]]:
        """This rank's candidate admissions [(u, HardExample)] and solved keys; depends on no store state."""
        candidates, solved = [], []
        for g in groups:
            size = len(g.rewards)
            if size == 0:
                continue
            key, wrong = (g.problem.id, int(g.expert)), g.num_wrong
            if self._solved(wrong, size):
                solved.append(key)
            if wrong > self.cfg.k_wrong:
                u = uniform(self.seed, "admit", step, *key)
                if u < self._admit_prob(size):
                    candidates.append((u, HardExample.from_group(g, step)))
        return candidates, solved

    def update(self, groups: Sequence[ExpertGroup], step: int) -> dict[str, float]:
        """Collective. Retire entries whose (problem, expert) this step solved, then admit new hard examples.

        Rules (independent of rank and order): an entry present before this step retires when any rank's group
        for its key is solved; candidates whose key was present are duplicates; the remaining candidates, by
        ascending admission hash, fill the room left under ``capacity``; the rest are rejected.
        """
        if step <= self.step:
            raise ValueError(f"HardExampleStore.update: step {step} is not after the store's last step {self.step}")
        self._counts = dict.fromkeys(COUNTS, 0)
        gathered = self._gather(self._classify(groups, step))
        present = set(self.entries)
        solved = {k for _, keys in gathered for k in keys}
        for key in sorted(solved & present):
            del self.entries[key]
            self._count("retired_solved")
        best: dict[Key, tuple[float, HardExample]] = {}
        for candidates, _ in gathered:
            for u, ex in candidates:
                key = ex.key
                if key in present:
                    self._count("duplicates")
                    continue
                if key in best:
                    self._count("duplicates")
                    if _tie_break(ex) >= _tie_break(best[key][1]):
                        continue
                best[key] = (u, ex)
        fresh = sorted(best.values(), key=lambda t: (t[0], t[1].key))
        room = max(self.cfg.capacity - len(self.entries), 0)
        for _, ex in fresh[:room]:
            self.entries[ex.key] = ex
            self._count("admissions")
        self._count("rejected_full", max(len(fresh) - room, 0))
        self.step = step
        self._replayed_step = None
        return self.metrics()

    def _count(self, name: str, n: int = 1) -> None:
        self._counts[name] += n
        self.totals[name] += n

    # ----------------------------------------------------------------------------------------------- replay
    @property
    def sft_due(self) -> bool:
        """The store holds ``capacity`` entries (or more, after seed_from): an SFT batch of ``capacity`` is due."""
        return len(self.entries) >= self.cfg.capacity

    def _draw(self) -> list[HardExample]:
        order = sorted(self.entries.values(), key=lambda e: (uniform(self.seed, "draw", self.step, *e.key), e.key))
        return order[: self.cfg.capacity]

    def sft_batch(self, dp_rank: int, dp_size: int) -> list[HardExample]:
        """This rank's contiguous 1/dp_size of the step's globally drawn SFT batch ([] when none is due)."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"sft_batch: need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if self.cfg.capacity % dp_size:
            raise ValueError(f"hard_examples.capacity ({self.cfg.capacity}) must be divisible by the data-parallel "
                             f"size ({dp_size}) so that the SFT batch splits evenly across ranks")
        if not self.sft_due:
            return []
        n = self.cfg.capacity // dp_size
        return self._draw()[dp_rank * n:(dp_rank + 1) * n]

    def record_replay(self) -> dict[str, float]:
        """After the SFT step: every drawn entry counts one replay; those reaching ``max_replays`` retire."""
        if not self.sft_due:
            raise RuntimeError("HardExampleStore.record_replay: no SFT batch is due at this step")
        if self._replayed_step == self.step:
            raise RuntimeError(f"HardExampleStore.record_replay: already recorded for step {self.step}")
        for ex in self._draw():
            self._count("replays")
            if ex.replays + 1 >= self.cfg.max_replays:
                del self.entries[ex.key]
                self._count("retired_max_replays")
            else:
                self.entries[ex.key] = replace(ex, replays=ex.replays + 1)
        self._replayed_step = self.step
        return self.metrics()

    # ---------------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """``hard/...`` metrics: this step's events, totals, size, mean age (steps), per-expert sizes."""
        m = {f"hard/{k}": float(v) for k, v in self._counts.items()}
        m.update({f"hard/{k}_total": float(v) for k, v in self.totals.items()})
        m["hard/retirements"] = m["hard/retired_solved"] + m["hard/retired_max_replays"]
        m["hard/size"] = float(len(self.entries))
        ages = [self.step - e.admitted_step for e in self.entries.values()]
        m["hard/mean_age"] = sum(ages) / len(ages) if ages else 0.0
        m["hard/sft_due"] = float(self.sft_due)
        for expert, n in sorted(Counter(k[1] for k in self.entries).items()):
            m[f"hard/expert/{expert}/size"] = float(n)
        return m

    # ------------------------------------------------------------------------------------------------ state
    def examples(self) -> list[HardExample]:
        """All entries, sorted by (problem id, expert)."""
        return [self.entries[k] for k in sorted(self.entries)]

    def state_dict(self) -> dict[str, Any]:
        """Everything the store is, as plain JSON-able data (entries sorted by key)."""
        return {"version": persist.VERSION, "step": self.step, "replayed_step": self._replayed_step,
                "totals": dict(self.totals), "entries": [e.to_json() for e in self.examples()]}

    def load_state_dict(self, state: dict[str, Any], where: str = "state_dict") -> None:
        if state.get("version") != persist.VERSION:
            raise ValueError(f"{where}: hard-example store version {state.get('version')!r}, "
                             f"this code reads version {persist.VERSION}")
        entries = [HardExample.from_json(row, f"{where}: entries[{i}]") for i, row in enumerate(state["entries"])]
        self.entries = {e.key: e for e in entries}
        self.step = int(state["step"])
        self._replayed_step = state["replayed_step"]
        self.totals = {k: int(state["totals"].get(k, 0)) for k in COUNTS}
        self._counts = dict.fromkeys(COUNTS, 0)

    # ------------------------------------------------------------------------------------------ persistence
    def _open(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        body = persist.read_manifest(directory)
        if self.rank == 0:
            persist.remove_orphans(directory, body)
        self._barrier()  # nobody starts a commit while rank 0 still cleans up
        if body is not None:
            self._load_body(directory, body)
        elif self.cfg.seed_from:
            self._seed(Path(self.cfg.seed_from))
            self.commit()

    def _load_body(self, directory: Path, body: dict[str, Any]) -> None:
        rows = persist.read_shards(directory, body)
        state = {**body["state"], "entries": [e.to_json() for e in rows]}
        self.load_state_dict(state, where=str(directory / persist.MANIFEST))
        if len(self.entries) != len(rows):
            raise persist.StoreCorruptError(f"{directory / persist.MANIFEST}: shards hold duplicate keys")

    def _seed(self, source: Path) -> None:
        body = persist.read_manifest(source)
        if body is None:
            raise FileNotFoundError(f"hard_examples.seed_from={source}: no {persist.MANIFEST} there; point it at "
                                    f"another job's store directory (<run_dir>/hard_examples)")
        for e in persist.read_shards(source, body):
            self.entries[e.key] = replace(e, admitted_step=-1, replays=0)

    def load(self, directory: str | Path) -> None:
        """Collective-free. Replace this store's state by the committed store in ``directory`` (a checkpoint copy)."""
        body = persist.read_manifest(Path(directory))
        if body is None:
            raise FileNotFoundError(f"{directory}: no {persist.MANIFEST}; not a hard-example store directory")
        self._load_body(Path(directory), body)

    def commit(self, directory: Optional[str | Path] = None) -> int:
        """Collective. Persist the store to ``directory`` (default: its own); returns the committed generation.

        Each rank writes its own shard (every world-th entry in key order) of the new generation; rank 0 then
        writes the manifest (the commit point) and removes superseded files.
        """
        target = Path(directory) if directory is not None else self.directory
        if target is None:
            raise ValueError("HardExampleStore.commit: this store is in memory only; pass a directory")
        target.mkdir(parents=True, exist_ok=True)
        previous = persist.read_manifest(target)
        generation = (previous["generation"] if previous else 0) + 1
        mine = self.examples()[self.rank::self.world]
        info = persist.write_shard(target, generation, self.rank, mine)
        infos = self._gather(asdict(info))
        if self.rank == 0:
            body = {"format": persist.FORMAT, "version": persist.VERSION, "generation": generation,
                    "seed": self.seed, "world_size": self.world, "config": asdict(self.cfg),
                    "entries": len(self.entries), "shards": infos, "state": self._manifest_state()}
            persist.write_manifest(target, body)
            persist.remove_orphans(target, body, below_generation=generation)
        self._barrier()
        return generation

    def save(self, directory: str | Path) -> int:
        """Collective. Commit a copy into ``directory`` (the training checkpoint calls this)."""
        return self.commit(directory)

    def _manifest_state(self) -> dict[str, Any]:
        state = self.state_dict()
        del state["entries"]
        return state
