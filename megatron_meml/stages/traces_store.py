"""The files of ``meml traces`` and how a run resumes: per-expert JSONL appended chunk by chunk, and a progress
file that commits each chunk.

Commit protocol, per chunk: append the chunk's rows to every file, flush and fsync them, then replace
``progress.json`` atomically (write a temporary file, fsync, rename, fsync the directory) with the new chunk count,
the byte size of every file and the running counts. On start, an existing ``progress.json`` must describe the same
settings (its fingerprint); every file is then cut back to its committed size, so rows a crash left after the last
commit are dropped and that chunk is drawn again, with the same seed. ``progress.json`` is written before the first
chunk, so a directory with trace files and no progress file is someone else's data and is not touched.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from megatron_meml.atomic_file import atomic_write
from megatron_meml.errors import TracesError
from megatron_meml.rewards.score import STATUSES

PROGRESS = "progress.json"
SUMMARY = "summary.json"
FRAGMENT = "traces.yaml"
SAMPLES_DIR = "samples"
VERSION = 1



@dataclass(kw_only=True)
class ExpertTally:
    """What one expert's sampling gave (summed over problems and chunks)."""

    problems: int = 0
    """Problems sampled (those whose prompt fits rollout.max_prompt_tokens)."""
    skipped_long_prompts: int = 0
    """Problems not sampled: the rendered prompt is longer than rollout.max_prompt_tokens."""
    samples_drawn: int = 0
    """Responses drawn (problems x samples_per_expert)."""
    correct: int = 0
    """Responses the verifier scored correct."""
    problems_with_trace: int = 0
    """Problems with at least one kept trace."""
    traces_kept: int = 0
    """Traces written (at most keep_per_problem per problem)."""
    dropped_truncated: int = 0
    """Correct responses not kept because they were cut at max_new_tokens (traces.require_stop)."""
    dropped_duplicate: int = 0
    """Correct responses not kept because an earlier kept one has the same text."""
    statuses: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STATUSES})
    """Verifier verdicts of the drawn responses: correct, wrong, no_answer, timeout."""

    @property
    def yield_(self) -> float:
        """correct / drawn (0 when nothing was drawn)."""
        return self.correct / self.samples_drawn if self.samples_drawn else 0.0

    def add(self, other: "ExpertTally") -> None:
        for name in ("problems", "skipped_long_prompts", "samples_drawn", "correct", "problems_with_trace",
                     "traces_kept", "dropped_truncated", "dropped_duplicate"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n

    def as_dict(self) -> dict[str, Any]:
        counts = {name: getattr(self, name) for name in ("problems", "problems_with_trace", "traces_kept",
                                                          "samples_drawn", "correct", "skipped_long_prompts",
                                                          "dropped_truncated", "dropped_duplicate")}
        return {**counts, "yield": self.yield_, "statuses": dict(self.statuses)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertTally":
        return cls(**{k: v for k, v in d.items() if k != "yield"})


@dataclass(kw_only=True)
class TraceStore:
    """The output directory of one ``meml traces`` run: trace files, optional sample files, progress."""

    out_dir: Path
    expert_ids: list[str]
    num_chunks: int
    save_samples: bool
    chunks_done: int = 0
    tallies: dict[str, ExpertTally] = field(default_factory=dict)

    def trace_file(self, eid: str) -> Path:
        return self.out_dir / f"{eid}.jsonl"

    def sample_file(self, eid: str) -> Path:
        return self.out_dir / SAMPLES_DIR / f"{eid}.jsonl"

    def files(self) -> list[Path]:
        paths = [self.trace_file(e) for e in self.expert_ids]
        return paths + ([self.sample_file(e) for e in self.expert_ids] if self.save_samples else [])

    @property
    def complete(self) -> bool:
        return self.chunks_done >= self.num_chunks

    # ------------------------------------------------------------------------------------------- open / resume
    @classmethod
    def open(cls, out_dir: Path, expert_ids: list[str], num_chunks: int, save_samples: bool,
             fingerprint: dict[str, Any]) -> "TraceStore":
        """Start a new run in ``out_dir`` or resume the one there (same fingerprint), cutting files back to the
        last committed chunk."""
        store = cls(out_dir=out_dir, expert_ids=list(expert_ids), num_chunks=num_chunks, save_samples=save_samples,
                    tallies={e: ExpertTally() for e in expert_ids})
        progress = out_dir / PROGRESS
        if progress.is_file():
            store._resume(progress, fingerprint)
            return store
        leftovers = [str(p) for p in store.files() + [out_dir / SUMMARY] if p.exists()]
        if leftovers:
            raise TracesError(f"traces.out_dir '{out_dir}' holds {leftovers[0]} but no {PROGRESS}: not a "
                              "`meml traces` run to continue; use an empty traces.out_dir or delete those files")
        (out_dir / SAMPLES_DIR if save_samples else out_dir).mkdir(parents=True, exist_ok=True)
        for p in store.files():
            p.touch()
        store._commit(fingerprint)
        return store

    def _resume(self, progress: Path, fingerprint: dict[str, Any]) -> None:
        try:
            state = json.loads(progress.read_text())
            old, sizes = state["fingerprint"], state["sizes"]
            self.chunks_done = int(state["chunks_done"])
            self.tallies = {e: ExpertTally.from_dict(state["tallies"][e]) for e in self.expert_ids}
        except (ValueError, KeyError, TypeError) as e:
            raise TracesError(f"{progress}: not a readable progress file ({type(e).__name__}: {e}); use a new "
                              "traces.out_dir or delete the directory to start over") from None
        diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(fingerprint.get(k))}" for k in diff[:4])
            raise TracesError(f"traces.out_dir '{self.out_dir}' holds a run with other settings ({shown}); rerun "
                              "with the old settings to continue it, or use a new traces.out_dir")
        for p in self.files():
            self._cut_back(p, sizes.get(str(p.relative_to(self.out_dir))))

    def _cut_back(self, path: Path, size: Optional[int]) -> None:
        """Truncate ``path`` to its committed ``size`` (rows after the last commit are dropped)."""
        have = path.stat().st_size if path.is_file() else -1
        if size is None or have < size:
            raise TracesError(f"{path}: {'missing or ' if have < 0 else ''}shorter than the {size} bytes "
                              f"{PROGRESS} committed (the file was changed); use a new traces.out_dir")
        if have > size:
            with path.open("r+b") as f:
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())

    # ------------------------------------------------------------------------------------------- one chunk
    def append_chunk(self, rows: dict[str, list[dict]], samples: dict[str, list[dict]],
                     tallies: dict[str, ExpertTally], fingerprint: dict[str, Any]) -> None:
        """Append one chunk's rows (expert id -> rows) to the files, fsync them, then commit the chunk."""
        for eid in self.expert_ids:
            _append(self.trace_file(eid), rows.get(eid, ()))
            if self.save_samples:
                _append(self.sample_file(eid), samples.get(eid, ()))
            self.tallies[eid].add(tallies[eid])
        self.chunks_done += 1
        self._commit(fingerprint)

    def _commit(self, fingerprint: dict[str, Any]) -> None:
        state = {"version": VERSION, "fingerprint": fingerprint, "chunks_done": self.chunks_done,
                 "num_chunks": self.num_chunks,
                 "sizes": {str(p.relative_to(self.out_dir)): p.stat().st_size for p in self.files()},
                 "tallies": {e: t.as_dict() for e, t in self.tallies.items()}}
        write_atomic(self.out_dir / PROGRESS, json.dumps(state, indent=1, sort_keys=True) + "\n")


def _append(path: Path, rows: Iterable[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    with path.open("ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a crash leaves either the old or the new file, never a torn one."""
    atomic_write(path, text.encode("utf-8"))


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
