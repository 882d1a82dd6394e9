"""Intervals for accuracies measured on a finite set of problems: Wilson intervals for one accuracy, and seeded
bootstrap intervals for paired differences (the same problems under two models, over one or several seeds)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

Z95 = 1.959963984540054
"""The two-sided 95% normal quantile."""


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def signed(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def wilson(successes: float, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of an accuracy ``successes / n`` (well behaved at 0 and 1, unlike the normal
    approximation)."""
    if n <= 0:
        raise ValueError("wilson: n must be >= 1")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 1]."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_bootstrap(runs: Sequence[tuple[Sequence[float], Sequence[float]]], *, resamples: int = 2000,
                     seed: int = 0) -> Interval:
    """Mean of ``a - b`` over problems (and seeds) with a 95% percentile bootstrap interval.

    ``runs`` holds one (a, b) pair per seed: per-problem scores of the two models on the same problems, in the
    same order. One seed: resample problems. Several: resample seeds, then problems within each drawn seed (the
    two-level bootstrap), so the interval covers both the problem sample and the seed-to-seed spread. The
    estimate is the mean over seeds of each seed's mean difference."""
    if not runs:
        raise ValueError("paired_bootstrap: no runs")
    diffs = []
    for a, b in runs:
        if len(a) != len(b) or not a:
            raise ValueError(f"paired_bootstrap: a run has {len(a)} and {len(b)} scores; they must be paired")
        diffs.append([x - y for x, y in zip(a, b)])
    value = sum(sum(d) / len(d) for d in diffs) / len(diffs)
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        picked = [diffs[rng.randrange(len(diffs))] for _ in diffs] if len(diffs) > 1 else diffs
        total = 0.0
        for d in picked:
            total += sum(d[rng.randrange(len(d))] for _ in d) / len(d)
        stats.append(total / len(picked))
    stats.sort()
    return Interval(value, _percentile(stats, 0.025), _percentile(stats, 0.975))
