"""``load_problems``: one entry point over every source; deterministic train/validation splits."""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Optional

from megatron_meml.data.benchmarks import PARSERS, hub_rows
from megatron_meml.data.config import SOURCES, DataConfig
from megatron_meml.data.rows import BadRows, DataError, RowRef, read_rows, require_object
from megatron_meml.data import wordmath
from megatron_meml.data.synthetic import generate_problems
from megatron_meml.types import Problem

log = logging.getLogger(__name__)


def load_problems(source: str, path: str | Path | None = None, split: str = "train", *,
                  skip_bad_rows: bool = False, hub_id: Optional[str] = None, seed: int = 0,
                  config: Optional[DataConfig] = None) -> list[Problem]:
    """Load problems of ``source`` (gsm8k, mathqa, strategyqa, jsonl, synthetic).

    A local ``path`` (.json/.jsonl) always wins; without one, gsm8k/mathqa/strategyqa load ``split`` from the
    hub via ``datasets`` (``hub_id`` overrides the default id). Every row is validated: a bad row raises one
    :class:`DataError` naming the file, line/index and field, or with ``skip_bad_rows`` is counted, logged and
    skipped. Duplicate ids are bad rows too (the later one). ``synthetic`` generates problems from ``config``'s
    synthetic_* fields (default DataConfig) and ``seed``; ``split`` picks an independent stream.
    """
    if source not in SOURCES:
        raise DataError(f"data.source must be one of {SOURCES}, got '{source}'")
    if source == "synthetic":
        return generate_problems(config or DataConfig(), seed=seed, split=split)
    if source == "wordmath":
        cfg = config or DataConfig()
        return wordmath.generate_problems(cfg.synthetic_levels, cfg.synthetic_weights, cfg.synthetic_size,
                                          seed=seed, split=split)
    if path is None and source == "jsonl":
        raise DataError("data.source=jsonl needs a local file: set data.path")
    if path is not None:
        rows = read_rows(path)
        tag, where = Path(path).stem, str(path)
    else:
        rows = hub_rows(source, hub_id, split)
        tag, where = split, f"hub:{hub_id or source}"
    bad = BadRows(skip=skip_bad_rows)
    parse = PARSERS[source]
    problems: list[Problem] = []
    seen: dict[str, RowRef] = {}
    for ref, row in rows:
        try:
            problem = parse(ref, require_object(ref, row), tag)
            if problem.id in seen:
                raise DataError(f"{ref.where()}: field 'id': duplicate id '{problem.id}' "
                                f"(first seen at {seen[problem.id].where()})")
        except DataError as err:
            bad.handle(err)
            continue
        seen[problem.id] = ref
        problems.append(problem)
    bad.summary(where)
    _report_duplicate_questions(problems, where)
    if not problems:
        raise DataError(f"{where}: no valid problems (skipped {len(bad.skipped)} bad row(s))")
    return problems


def _report_duplicate_questions(problems: list[Problem], where: str) -> None:
    counts = Counter(p.question for p in problems)
    dups = sum(c - 1 for c in counts.values() if c > 1)
    if dups:
        log.info("%s: %d problem(s) repeat an earlier question text under a different id", where, dups)


def split_problems(problems: list[Problem], val_fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Deterministic (train, validation) split: ``round(n * val_fraction)`` problems go to validation.

    Membership depends only on (seed, id), never on row order, so adding rows to a file moves no other problem
    across the split. Both parts keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(problems) * val_fraction)
    ranked = sorted(range(len(problems)), key=lambda i: _split_key(seed, problems[i].id))
    val_idx = set(ranked[:n_val])
    train = [p for i, p in enumerate(problems) if i not in val_idx]
    val = [p for i, p in enumerate(problems) if i in val_idx]
    return train, val


def _split_key(seed: int, pid: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{pid}".encode()).digest()


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, validation) problems for a run: ``cfg.eval_path`` when given, else a held-out fraction."""
    if cfg.source == "wordmath":
        return _wordmath_splits(cfg, seed)
    kwargs = dict(skip_bad_rows=cfg.skip_bad_rows, hub_id=cfg.hub_id, seed=seed, config=cfg)
    train = load_problems(cfg.source, cfg.path, cfg.split, **kwargs)
    if cfg.eval_path is not None:
        val = load_problems(cfg.source, cfg.eval_path, "validation", **kwargs)
    else:
        train, val = split_problems(train, cfg.val_fraction, seed)
    if cfg.max_problems is not None:
        train = train[: cfg.max_problems]
    return train, val


def _wordmath_splits(cfg: DataConfig, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Word arithmetic: ``round(size * val_fraction)`` held-out problems (of ``eval_levels`` when set) from their own
    stream, then the rest of ``synthetic_size`` for training with no held-out question text among them (small
    levels repeat otherwise)."""
    n_val = round(cfg.synthetic_size * cfg.val_fraction)
    levels, weights = cfg.synthetic_levels, cfg.synthetic_weights
    eval_levels = cfg.eval_levels or levels
    eval_weights = cfg.eval_weights or (weights if cfg.eval_levels is None else [1.0] * len(eval_levels))
    val = wordmath.generate_problems(eval_levels, eval_weights, n_val, seed=seed, split="validation") if n_val else []
    train = wordmath.generate_problems(levels, weights, cfg.synthetic_size - n_val, seed=seed, split="train",
                                       exclude=frozenset(p.question for p in val))
    if cfg.max_problems is not None:
        train = train[: cfg.max_problems]
    return train, val
