"""Hard-example store configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, kw_only=True)
class HardExampleConfig:
    """Paper's hard-example accumulation, as a persistent distributed store."""

    enabled: bool = True
    """Admit hard examples and replay them with SFT."""
    k_wrong: int = 6
    """An expert with more than k_wrong wrong answers of its G admits the example (probability k_wrong / G)."""
    capacity: int = 64
    """B: when the store holds B entries, an SFT batch is due."""
    max_replays: int = 4
    """An entry retires after this many SFT replays even if never solved."""
    seed_from: Optional[str] = None
    """Start from another job's store directory."""

    def __post_init__(self) -> None:
        if self.k_wrong < 0:
            raise ValueError(f"hard_examples.k_wrong must be >= 0, got {self.k_wrong}")
        if self.capacity < 1:
            raise ValueError(f"hard_examples.capacity must be >= 1, got {self.capacity}")
        if self.max_replays < 1:
            raise ValueError(f"hard_examples.max_replays must be >= 1, got {self.max_replays}")
