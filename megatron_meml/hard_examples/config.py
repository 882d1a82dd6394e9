"""Hard-example store configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, kw_only=True)
class HardExampleConfig:
    """Paper's hard-example accumulation, as a persistent distributed store.

    The store directory is not a field: the caller passes it (``<run_dir>/hard_examples``).
    """

    enabled: bool = True
    """Admit hard examples and replay them with SFT."""
    k_wrong: int = 6
    """An expert with more than k_wrong wrong answers of its G admits the example (probability k_wrong / G)."""
    admit_prob: Optional[float] = None
    """Admission probability of a hard (problem, expert); None: k_wrong / G, as in the paper (6 / 8)."""
    capacity: int = 64
    """B: the store holds at most B entries; when it holds B, an SFT batch of B is due (B % DP size must be 0)."""
    max_replays: int = 4
    """An entry retires after this many SFT replays even if never solved."""
    retire_min_correct: Optional[int] = None
    """A later rollout retires its entry with at least this many correct of G; None: when no longer hard."""
    seed_from: Optional[str] = None
    """Start from another job's store directory (its entries, with replay counts reset)."""
    target: str = "expert_style"
    """SFT target of a replayed (problem, expert): expert_style (gold work in that expert's style where the data has
    one, as the synthetic family does; else the problem's solution) or solution (the problem's own solution for
    every expert: the paper's (Q, P_i, ground-truth solution))."""

    def __post_init__(self) -> None:
        if self.target not in ("expert_style", "solution"):
            raise ValueError(f"hard_examples.target must be 'expert_style' or 'solution', got '{self.target}'")
        if self.k_wrong < 0:
            raise ValueError(f"hard_examples.k_wrong must be >= 0, got {self.k_wrong}")
        if self.admit_prob is not None and not 0.0 <= self.admit_prob <= 1.0:
            raise ValueError(f"hard_examples.admit_prob must be in [0, 1] or null, got {self.admit_prob}")
        if self.capacity < 1:
            raise ValueError(f"hard_examples.capacity must be >= 1, got {self.capacity}")
        if self.max_replays < 1:
            raise ValueError(f"hard_examples.max_replays must be >= 1, got {self.max_replays}")
        if self.retire_min_correct is not None and self.retire_min_correct < 1:
            raise ValueError(
                f"hard_examples.retire_min_correct must be >= 1 or null, got {self.retire_min_correct}")
