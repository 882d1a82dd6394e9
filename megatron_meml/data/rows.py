"""Reading raw rows from local files, with errors that name the file, the row and the field.

A *row* is one JSON object: one line of a ``.jsonl`` file, or one element of a top-level JSON list.
Every loader goes through :func:`read_rows` and the ``field`` helpers below, so every bad row fails the
same way: one :class:`DataError` saying where and what, or (``skip_bad_rows``) one counted, logged skip.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from megatron_meml.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")



@dataclass(frozen=True, kw_only=True)
class RowRef:
    """Where a row came from, for error messages."""

    file: str
    """Path (or hub id) of the file."""
    index: int
    """0-based row index within the file."""
    line: Optional[int] = None
    """1-based line number for JSONL files; None for JSON lists and hub rows."""

    def where(self) -> str:
        loc = f"line {self.line}" if self.line is not None else f"index {self.index}"
        return f"{self.file}, {loc}"


@dataclass(kw_only=True)
class BadRows:
    """Skip policy and tally of invalid rows for one load."""

    skip: bool = False
    """True: count, log and skip bad rows; False: raise on the first one."""
    skipped: list[str] = field(default_factory=list)
    """One message per skipped row."""

    def handle(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.skipped.append(str(err))
        log.warning("skipping bad row: %s", err)

    def summary(self, file: str) -> None:
        if self.skipped:
            log.warning("%s: skipped %d bad row(s) (data.skip_bad_rows=true)", file, len(self.skipped))


def read_rows(path: str | Path) -> Iterator[tuple[RowRef, Any]]:
    """Yield (where, parsed row) for a ``.jsonl`` file (one object per line) or a ``.json`` list/object-of-rows.

    A line that is not valid JSON is yielded as a :class:`DataError` instead of a row, so the caller's skip
    policy applies to it like to any other bad row.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p} (set data.path to an existing .json/.jsonl file)")
    if p.suffix == ".jsonl":
        yield from _read_jsonl(p)
        return
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of rows at the top level, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield RowRef(file=str(p), index=i), row


def _read_jsonl(p: Path) -> Iterator[tuple[RowRef, Any]]:
    index = 0
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            ref = RowRef(file=str(p), index=index, line=lineno)
            index += 1
            try:
                yield ref, json.loads(line)
            except json.JSONDecodeError as e:
                yield ref, DataError(f"{ref.where()}: not valid JSON: {e.msg} (column {e.colno})")


def require_object(ref: RowRef, row: Any) -> dict:
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{ref.where()}: expected a JSON object, got {type(row).__name__}")
    return row


def req_str(ref: RowRef, row: dict, key: str, *, allow_empty: bool = False) -> str:
    """The string field ``key``; a DataError naming the row and key when missing, not a string, or empty."""
    if key not in row or row[key] is None:
        raise DataError(f"{ref.where()}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{ref.where()}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{ref.where()}: field '{key}' is empty")
    return value


def opt(ref: RowRef, row: dict, key: str, types: tuple[type, ...], default: T) -> Any:
    """Optional field ``key`` of one of ``types`` (``default`` when absent or null)."""
    value = row.get(key)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(f"{ref.where()}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def parse_rows(rows: Iterator[tuple[RowRef, Any]], parse: Callable[[RowRef, dict], T], bad: BadRows) -> list[T]:
    """Apply ``parse(ref, row_dict)`` to every row under the skip policy ``bad``."""
    out: list[T] = []
    for ref, row in rows:
        try:
            out.append(parse(ref, require_object(ref, row)))
        except DataError as err:
            bad.handle(err)
    return out
