"""A resumable, deterministic, data-parallel-aware sampler over a list of problems.

The global stream is the concatenation of per-epoch permutations (epoch ``e`` shuffled by ``(seed, e)``).
Each ``next_batch(n)`` consumes ``n * dp_size`` consecutive stream positions; rank ``r`` gets positions
``[r * n, (r + 1) * n)`` of that chunk, so ranks are disjoint within a step, and all ranks agree on the cursor
(``state_dict`` is the same on every rank: save it from any one). A batch that crosses an epoch end continues
into the next epoch's permutation; nothing is dropped. Resuming with another ``dp_size`` keeps the global
cursor, so no problem is repeated or skipped across the change.
"""
from __future__ import annotations

import random
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")


class ProblemSampler(Generic[T]):
    """Epoch-shuffled batches of ``items`` for one data-parallel rank."""

    def __init__(self, items: Sequence[T], *, seed: int, dp_rank: int = 0, dp_size: int = 1) -> None:
        if not items:
            raise ValueError("ProblemSampler needs at least one item")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"ProblemSampler: need 0 <= dp_rank < dp_size, got dp_rank={dp_rank} dp_size={dp_size}")
        self.items = items
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.epoch = 0
        """Epoch of the global cursor."""
        self.offset = 0
        """Position of the global cursor within the epoch's permutation."""
        self._perms: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        """The item order of ``epoch`` (a pure function of seed, epoch and the item count)."""
        if epoch not in self._perms:
            order = list(range(len(self.items)))
            random.Random(f"meml-sampler:{self.seed}:{epoch}").shuffle(order)
            self._perms = {e: p for e, p in self._perms.items() if e >= self.epoch}
            self._perms[epoch] = order
        return self._perms[epoch]

    def _take(self, count: int) -> list[int]:
        """Advance the global cursor by ``count`` and return the item indices it passed."""
        out: list[int] = []
        while len(out) < count:
            perm = self.permutation(self.epoch)
            step = min(count - len(out), len(perm) - self.offset)
            out.extend(perm[self.offset: self.offset + step])
            self.offset += step
            if self.offset == len(perm):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def next_indices(self, n: int) -> list[int]:
        """This rank's ``n`` item indices of the next global batch of ``n * dp_size``."""
        if n < 1:
            raise ValueError(f"next_batch: n must be >= 1, got {n}")
        chunk = self._take(n * self.dp_size)
        return chunk[self.dp_rank * n: (self.dp_rank + 1) * n]

    def next_batch(self, n: int) -> list[T]:
        """This rank's ``n`` items of the next global batch of ``n * dp_size``."""
        return [self.items[i] for i in self.next_indices(n)]

    def state_dict(self) -> dict[str, int]:
        """The global cursor (identical on every rank)."""
        return {"seed": self.seed, "num_items": len(self.items), "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved cursor; the seed and item count must match the saved run."""
        for key in ("seed", "num_items", "epoch", "offset"):
            if key not in state:
                raise ValueError(f"sampler state: missing key '{key}'")
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state: key 'seed' is {state['seed']}, this run uses {self.seed}")
        if state["num_items"] != len(self.items):
            raise ValueError(f"sampler state: key 'num_items' is {state['num_items']} but {len(self.items)} problems "
                             f"are loaded (the data changed since the checkpoint)")
        if not 0 <= state["offset"] < len(self.items) or state["epoch"] < 0:
            raise ValueError(f"sampler state: epoch/offset out of range: {state['epoch']}/{state['offset']}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perms = {}
