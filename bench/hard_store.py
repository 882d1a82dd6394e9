"""Hard-example store throughput at 100,000 entries: admission, commit, reopen; bytes per entry.

Entries carry real GSM8K questions and worked solutions (../shared/data/gsm8k/train.jsonl, cycled; synthetic
text of the same length when the file is absent). The commit is also compared side by side with a plain
``json.dump`` of the same rows to one file (no checksum, fsync or rename), to show what durability costs.

    python bench/hard_store.py [--entries 100000] [--data PATH]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from megatron_meml.hard_examples import HardExampleConfig, HardExampleStore
from megatron_meml.types import ExpertGroup, Problem

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def _texts(path: Path) -> list[tuple[str, str]]:
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(r["question"], r["answer"]) for r in rows]
    print(f"({path} not found: synthetic text of GSM8K length)")
    return [("How many apples are left? " * 9, "First compute the total. " * 12)] * 1000


def _groups(n: int, texts: list[tuple[str, str]]) -> list[ExpertGroup]:
    out = []
    for i in range(n):
        question, solution = texts[i % len(texts)]
        problem = Problem(id=f"gsm8k/{i}", question=question, answer=solution.rsplit("####", 1)[-1].strip(),
                          solution=solution, source="gsm8k")
        out.append(ExpertGroup(problem=problem, expert=i % 3, completions=[], rewards=[0.0] * 8))
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=10, help="admission happens over this many RIEL steps")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.entries
    groups = _groups(n, _texts(args.data))
    cfg = HardExampleConfig(capacity=n, admit_prob=1.0, max_replays=4)
    per_step = -(-n // args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        store = HardExampleStore(cfg, Path(tmp) / "store", seed=0)
        t_admit = _timed(lambda: [store.update(groups[s * per_step:(s + 1) * per_step], s)
                                  for s in range(args.steps)])
        assert len(store.entries) == n, len(store.entries)
        t_commit = _timed(store.commit)
        t_plain = _timed(lambda: _plain_dump(store, Path(tmp) / "plain.json"))
        shard_bytes = sum(p.stat().st_size for p in (Path(tmp) / "store").glob("gen-*.jsonl"))
        manifest_bytes = (Path(tmp) / "store" / "MANIFEST.json").stat().st_size
        t_open = _timed(lambda: HardExampleStore(cfg, Path(tmp) / "store", seed=0))
        t_draw = _timed(lambda: store.sft_batch(0, 1))
    print(f"hard-example store, {n:,} entries, 1 rank, torch threads 1")
    print(f"  admission (update, {args.steps} steps) {n / t_admit:12,.0f} entries/s  ({t_admit:.2f} s)")
    print(f"  commit (sha256+fsync+rename)         {n / t_commit:12,.0f} entries/s  ({t_commit:.2f} s)")
    print(f"  plain json.dump, same rows            {n / t_plain:12,.0f} entries/s  ({t_plain:.2f} s)")
    print(f"  commit / plain dump time ratio        {t_commit / t_plain:12.2f}")
    print(f"  reopen (verify + parse)               {n / t_open:12,.0f} entries/s  ({t_open:.2f} s)")
    print(f"  SFT draw over the whole store         {n / t_draw:12,.0f} entries/s  ({t_draw:.2f} s)")
    print(f"  bytes per entry                       {shard_bytes / n:12.1f}  (+ manifest {manifest_bytes} B)")


def _plain_dump(store: HardExampleStore, path: Path) -> None:
    with open(path, "w") as f:
        json.dump([e.to_json() for e in store.examples()], f)


if __name__ == "__main__":
    main()
