"""Data configuration: which benchmark (or the synthetic family), where from, splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

SOURCES = ("synthetic", "wordmath", "gsm8k", "mathqa", "strategyqa", "jsonl")
SYNTHETIC_OPS = ("add", "mul", "expr")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Problems for training and evaluation."""

    source: str = "synthetic"
    """synthetic (character-level arithmetic for the toy), wordmath (word arithmetic in graded levels for real
    tokenizers), gsm8k, mathqa, strategyqa or jsonl."""
    path: Optional[str] = None
    """Local file for the train split (wins over the hub)."""
    eval_path: Optional[str] = None
    """Local file for the evaluation split; None: a held-out fraction of the train split (synthetic: any value
    gives an independently generated validation stream instead)."""
    hub_id: Optional[str] = None
    """Hub dataset id override (used only when no local path is given)."""
    split: str = "train"
    """Split name for hub loading."""
    val_fraction: float = 0.1
    """Fraction held out for validation when no eval_path is given (deterministic by seed)."""
    max_problems: Optional[int] = None
    """Cap on loaded train problems (after the split)."""
    skip_bad_rows: bool = False
    seed: Optional[int] = None
    """Seed of the held-out split and of generated problems (synthetic, wordmath); null: the global ``seed``.
    Pin it to vary the training seed on fixed problems: `meml compare` does for the defaults whose MEF needs
    teacher traces, which are drawn once for one set of train problems."""
    """Count, log and skip invalid rows instead of raising."""
    synthetic_levels: List[int] = field(default_factory=lambda: [1, 2, 3])
    """Synthetic and wordmath: difficulty levels in the mixture (synthetic: operand digits; wordmath: the level
    table in data/wordmath.py, 1-7)."""
    synthetic_weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Synthetic and wordmath: mixture weight of each level."""
    synthetic_ops: List[str] = field(default_factory=lambda: ["add"])
    """Synthetic: operations (add, mul, expr)."""
    synthetic_size: int = 4096
    """Synthetic and wordmath: number of generated problems (wordmath: train + held-out together)."""
    eval_levels: Optional[List[int]] = None
    """Wordmath: levels of the held-out problems (with ``eval_weights``); None: the training levels. A MEF recipe
    that trains on easy levels can so evaluate on the RL recipe's held-out problems: the same levels, weights,
    size, fraction and seed give the same problems."""
    eval_weights: Optional[List[float]] = None
    """Wordmath: mixture weight of each of ``eval_levels`` (None: equal)."""
    dev_size: int = 0
    """Validation (dev) problems apart from the train and the held-out test problems, for choices that must not look
    at the test problems (`meml compare`'s best-on-dev expert); evaluation reports them as ``eval/dev/...``. Wordmath:
    drawn from their own stream, of the held-out levels, and counted in ``synthetic_size``; other sources: the
    ``dev_size`` held-out problems ranked first by a hash of (seed, id), taken out of the test problems. 0: none."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got '{self.source}'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.synthetic_levels) != len(self.synthetic_weights):
            raise ValueError("data.synthetic_levels and data.synthetic_weights must have the same length")
        if not self.synthetic_levels or any(lvl < 1 for lvl in self.synthetic_levels):
            raise ValueError(f"data.synthetic_levels must be digit counts >= 1, got {self.synthetic_levels}")
        if any(w < 0 for w in self.synthetic_weights) or sum(self.synthetic_weights) <= 0:
            raise ValueError(f"data.synthetic_weights must be >= 0 with a positive sum, got {self.synthetic_weights}")
        bad_ops = [op for op in self.synthetic_ops if op not in SYNTHETIC_OPS]
        if not self.synthetic_ops or bad_ops:
            raise ValueError(f"data.synthetic_ops must be a non-empty subset of {SYNTHETIC_OPS}, got {self.synthetic_ops}")
        if self.synthetic_size < 1:
            raise ValueError(f"data.synthetic_size must be >= 1, got {self.synthetic_size}")
        if self.eval_weights is not None and (self.eval_levels is None
                                              or len(self.eval_weights) != len(self.eval_levels)):
            raise ValueError("data.eval_weights needs data.eval_levels of the same length")
        if self.eval_levels is not None and (not self.eval_levels or any(lvl < 1 for lvl in self.eval_levels)):
            raise ValueError(f"data.eval_levels must be levels >= 1, got {self.eval_levels}")
        if self.dev_size < 0:
            raise ValueError(f"data.dev_size must be >= 0, got {self.dev_size}")
        if self.max_problems is not None and self.max_problems < 1:
            raise ValueError(f"data.max_problems must be >= 1 or null, got {self.max_problems}")
