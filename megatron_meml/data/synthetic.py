"""The synthetic arithmetic family: fixed-width problems with gold work in several styles, one per expert.

Difficulty level = digits per operand. Operands are zero-padded to exactly ``level`` digits and answers to a
fixed width (``level + 1`` for sums, ``2 * level`` for products): in a prototype, variable-length numbers
taught a ~1M-parameter char model nothing in minutes, zero-padded ones learned. Operations:

- ``add``:  ``0123+0456``        answer ``00579``
- ``expr``: ``0123+0456+0321``   (two steps) answer ``00900``
- ``mul``:  ``0123*0456``        answer ``00056088``

Gold work styles (``Problem.meta["solutions"][style]``; the text *before* the final answer line, which the
expert set appends in the configured answer format):

- ``direct``: nothing, only the answer.
- ``steps``: left to right. add: the sum of ever longer prefixes (``0+0=00``, ``01+04=005``, ...);
  expr: one line per operation (``0123+0456=00579``, ``00579+0321=00900``); mul: one shifted partial product
  per digit of the second operand, least significant first, then their running total.
- ``columns``: column-wise, least significant digit first, one line ``"<digits> <sum digit> <carry>"`` per
  column (``3 6 9 0`` = 3 + 6 -> 9 carry 0); mul: shifted partial products each followed by the running total.

Everything is a pure function of (config, seed, split): the same inputs give the same problems.
"""
from __future__ import annotations

import random
from typing import Sequence

from megatron_meml.data.config import SYNTHETIC_OPS as OPS
from megatron_meml.types import Problem

STYLES = ("direct", "steps", "columns")
ALPHABET = "0123456789+*= \n"
"""Every character a synthetic question or gold work text can contain (answer lines add their own)."""


def _pad(value: int, width: int) -> str:
    return str(value).zfill(width)


def _column_lines(operands: Sequence[str], width: int) -> list[str]:
    """Column-wise addition of zero-padded operands, least significant column first, over ``width`` columns."""
    lines, carry = [], 0
    padded = [o.zfill(width) for o in operands]
    for col in range(width - 1, -1, -1):
        digits = [int(o[col]) for o in padded]
        total = sum(digits) + carry
        lines.append(" ".join(str(d) for d in digits) + f" {total % 10} {total // 10}")
        carry = total // 10
    return lines


def _add_work(a: str, b: str) -> dict[str, str]:
    d = len(a)
    steps = [f"{a[:k]}+{b[:k]}={_pad(int(a[:k]) + int(b[:k]), k + 1)}" for k in range(1, d + 1)]
    return {"direct": "", "steps": "\n".join(steps), "columns": "\n".join(_column_lines([a, b], d))}


def _expr_work(operands: Sequence[str], width: int) -> dict[str, str]:
    steps, acc = [], operands[0]
    for o in operands[1:]:
        total = _pad(int(acc) + int(o), width)
        steps.append(f"{acc}+{o}={total}")
        acc = total
    return {"direct": "", "steps": "\n".join(steps), "columns": "\n".join(_column_lines(operands, len(operands[0])))}


def _mul_work(a: str, b: str) -> dict[str, str]:
    width = 2 * len(a)
    partials, totals, acc = [], [], 0
    for j, digit in enumerate(reversed(b)):
        part = int(a) * int(digit) * 10 ** j
        acc += part
        partials.append(f"{a}*{digit}{'0' * j}={_pad(part, width)}")
        totals.append(f"{partials[-1]} {_pad(acc, width)}")
    return {"direct": "", "steps": "\n".join(partials), "columns": "\n".join(totals)}


def make_problem(op: str, level: int, rng: random.Random, pid: str) -> Problem:
    """One problem of operation ``op`` with ``level``-digit operands drawn from ``rng``."""
    if op not in OPS:
        raise ValueError(f"synthetic op must be one of {OPS}, got '{op}'")
    if level < 1:
        raise ValueError(f"synthetic level (digits) must be >= 1, got {level}")
    n_operands = 3 if op == "expr" else 2
    operands = [_pad(rng.randrange(10 ** level), level) for _ in range(n_operands)]
    if op == "add":
        answer, work = _pad(int(operands[0]) + int(operands[1]), level + 1), _add_work(*operands)
    elif op == "expr":
        answer, work = _pad(sum(int(o) for o in operands), level + 1), _expr_work(operands, level + 1)
    else:
        answer, work = _pad(int(operands[0]) * int(operands[1]), 2 * level), _mul_work(*operands)
    sign = "*" if op == "mul" else "+"
    return Problem(id=pid, question=sign.join(operands), answer=answer, solution=work["steps"], kind="math",
                   source="synthetic", meta={"op": op, "level": level, "solutions": work})


def level_counts(weights: Sequence[float], size: int) -> list[int]:
    """Exact per-level problem counts for ``size`` problems (largest remainder), so small weights still appear."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("data.synthetic_weights must have a positive sum")
    raw = [size * w / total for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: size - sum(counts)]:
        counts[i] += 1
    return counts


def generate_problems(cfg, *, seed: int, split: str = "train") -> list[Problem]:
    """``cfg.synthetic_size`` problems mixing ``cfg.synthetic_levels`` by ``cfg.synthetic_weights`` (exact
    counts, shuffled), each operation drawn uniformly from ``cfg.synthetic_ops``. ``cfg`` is a DataConfig.
    Different ``split`` names give independent streams (small levels can still repeat a question)."""
    rng = random.Random(f"meml-synthetic:{seed}:{split}")
    counts = level_counts(cfg.synthetic_weights, cfg.synthetic_size)
    plan = [lvl for lvl, c in zip(cfg.synthetic_levels, counts) for _ in range(c)]
    rng.shuffle(plan)
    ops = list(cfg.synthetic_ops)
    return [make_problem(rng.choice(ops), lvl, rng, f"synthetic/{split}/{i}") for i, lvl in enumerate(plan)]
