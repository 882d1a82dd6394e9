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
from megatron_meml.types import Problem, ProblemSplits

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


def load_splits(cfg: DataConfig, seed: int) -> ProblemSplits:
    """A run's (train, test, dev) problems: the test problems are ``cfg.eval_path`` when given, else a held-out
    fraction; the dev problems (``cfg.dev_size``) a slice of them (:func:`dev_slice`; wordmath: their own stream)."""
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
    test, dev = dev_slice(val, cfg.dev_size, seed)
    return ProblemSplits(train=train, test=test, dev=dev)


def dev_slice(held_out: list[Problem], dev_size: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(test, dev): the ``dev_size`` problems of ``held_out`` ranked first by sha256 of (seed, "dev", id) are the
    dev problems, the others the test problems, both in input order (membership depends on (seed, id) only, as in
    :func:`split_problems`)."""
    if dev_size == 0:
        return held_out, []
    if dev_size >= len(held_out):
        raise DataError(f"data.dev_size={dev_size} leaves no test problems: the held-out split has {len(held_out)}; "
                        "lower data.dev_size or hold out more (data.val_fraction, data.eval_path)")
    ranked = sorted(range(len(held_out)), key=lambda i: _split_key(seed, f"dev\x00{held_out[i].id}"))
    dev_idx = set(ranked[:dev_size])
    return ([p for i, p in enumerate(held_out) if i not in dev_idx],
            [p for i, p in enumerate(held_out) if i in dev_idx])


def _wordmath_splits(cfg: DataConfig, seed: int) -> ProblemSplits:
    """Word arithmetic: ``round(size * val_fraction)`` test problems (of ``eval_levels`` when set) from their own
    stream, then ``dev_size`` dev problems of the same levels from theirs, then the rest of ``synthetic_size`` for
    training; no question text is in two of them (small levels repeat otherwise). The test problems do not depend
    on ``dev_size``."""
    n_val = round(cfg.synthetic_size * cfg.val_fraction)
    n_train = cfg.synthetic_size - n_val - cfg.dev_size
    if cfg.dev_size and n_train < 1:
        raise DataError(f"data.dev_size={cfg.dev_size} with {n_val} test problems leaves no training problems of "
                        f"data.synthetic_size={cfg.synthetic_size}; raise synthetic_size or lower dev_size")
    levels, weights = cfg.synthetic_levels, cfg.synthetic_weights
    eval_levels = cfg.eval_levels or levels
    eval_weights = cfg.eval_weights or (weights if cfg.eval_levels is None else [1.0] * len(eval_levels))
    val = wordmath.generate_problems(eval_levels, eval_weights, n_val, seed=seed, split="validation") if n_val else []
    dev = (wordmath.generate_problems(eval_levels, eval_weights, cfg.dev_size, seed=seed, split="dev",
                                      exclude=frozenset(p.question for p in val)) if cfg.dev_size else [])
    train = wordmath.generate_problems(levels, weights, n_train, seed=seed, split="train",
                                       exclude=frozenset(p.question for p in val + dev))
    if cfg.max_problems is not None:
        train = train[: cfg.max_problems]
    return ProblemSplits(train=train, test=val, dev=dev)
