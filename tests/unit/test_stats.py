"""Intervals: Wilson against hand-worked values, the paired bootstrap against cases whose answer is known."""
from __future__ import annotations

import math
import random

import pytest

from megatron_meml.reporting.stats import Interval, paired_bootstrap, wilson


def test_wilson_hand_worked():
    # 20 of 100: p = 0.2, z = 1.96: centre (0.2 + 1.96^2/200) / (1 + 1.96^2/100) = 0.219208 / 1.038416 = 0.21110,
    # half 1.96 sqrt(0.0016 + 0.000096) / 1.038416 = 1.96 * 0.041183 / 1.038416 = 0.07773 -> [0.1334, 0.2888]
    iv = wilson(20, 100)
    assert iv.value == 0.2
    assert iv.low == pytest.approx(0.1334, abs=2e-4) and iv.high == pytest.approx(0.2888, abs=2e-4)
    zero = wilson(0, 50)  # no success: the interval still has width (the normal approximation gives [0, 0])
    assert zero.low == pytest.approx(0.0, abs=1e-12) and zero.high == pytest.approx(1.96 ** 2 / (50 + 1.96 ** 2), rel=1e-3)
    with pytest.raises(ValueError):
        wilson(1, 0)


def test_paired_bootstrap_constant_difference_and_no_difference():
    a = [1.0] * 30 + [0.0] * 70
    b = [0.0] * 30 + [0.0] * 70
    iv = paired_bootstrap([(a, b)], resamples=500)
    assert iv.value == pytest.approx(0.3)
    # the difference is 1 on 30 problems, 0 on 70: the interval is the binomial one, ~ +-1.96 sqrt(.3 .7 / 100)
    assert iv.low == pytest.approx(0.3 - 0.0898, abs=0.03) and iv.high == pytest.approx(0.3 + 0.0898, abs=0.03)
    assert iv.excludes_zero
    same = paired_bootstrap([(a, list(a))], resamples=200)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_pairs_problems_and_covers_seeds():
    """Pairing removes the problems' own spread: two models right on the same hard problems differ by little
    though each accuracy is uncertain; the seed level widens the interval when seeds disagree."""
    rng = random.Random(0)
    a = [1.0 if rng.random() < 0.5 else 0.0 for _ in range(200)]
    b = list(a)
    for i in range(0, 200, 20):  # b loses 10 problems a solves
        b[i] = 0.0
        a[i] = 1.0
    one = paired_bootstrap([(a, b)], resamples=1000, seed=1)
    assert one.value == pytest.approx(sum(x - y for x, y in zip(a, b)) / 200)
    assert one.high - one.low < 0.08  # an unpaired 95% interval here would be ~ +-0.14
    flip = [(b, a)]
    seeds = paired_bootstrap([(a, b), *flip], resamples=1000, seed=1)  # one seed up, one down by the same
    assert seeds.value == pytest.approx(0.0, abs=1e-12)
    assert seeds.low < -0.03 and seeds.high > 0.03
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([(a, b[:-1])])


def test_interval_text():
    assert str(Interval(0.25, 0.2, 0.3)) == "0.250 [0.200, 0.300]"
    assert Interval(0.05, -0.01, 0.11).signed() == "+0.050 [-0.010, +0.110]"
    assert not Interval(0.05, -0.01, 0.11).excludes_zero and Interval(-0.2, -0.3, -0.1).excludes_zero
    assert math.isclose(wilson(100, 100).high, 1.0)
