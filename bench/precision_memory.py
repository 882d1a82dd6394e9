"""Train/rollout log-prob mismatch and peak memory of the trainer and the engine, by dtype, on the real model.

Runs the same short `meml train` (recipes/smollm2-wordmath.yaml unless --recipe; the engine in its own process so
the two are measured apart) once per dtype, one after another, and prints per dtype: the trainer process's and the
engine processes' (EngineCore, Worker, transient compile workers) proportional resident memory (PSS, polled
from /proc: peak and median), the trainer's own
``memory/peak_rss_gb``, and the mean ``train/mismatch_abs`` (mean |log p_trainer - log p_engine| over the GRPO
tokens) and ``train/mismatch_k3`` over the steps. Memory and mismatch do not depend on machine load, timings do.

    .venv/bin/python bench/precision_memory.py                      # fp32 and bf16, 2 steps, 1 problem per step
    .venv/bin/python bench/precision_memory.py --set model.megatron_path=runs/.../final_model
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_run import ROOT, train_rows  # noqa: E402


def _tree(root: int) -> list[int]:
    """``root`` and every descendant process (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_gib(pid: int) -> float:
    """Proportional set size: resident memory with shared pages (libraries, the weight-sync arena in /dev/shm)
    divided among the processes that map them, so the processes' figures add up (RSS would count them in each)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run(recipe: str, dtype: str, steps: int, threads: int, extra: list[str], out: Path) -> dict:
    peak = {"trainer": 0.0, "engine": 0.0}
    engine_samples: list[float] = []

    def sample(pid: int) -> None:
        # every child: vLLM's EngineCore, its Worker (the model runner), transient compile workers
        engine = sum(_pss_gib(p) for p in _tree(pid) if p != pid)
        peak["trainer"] = max(peak["trainer"], _pss_gib(pid))
        peak["engine"] = max(peak["engine"], engine)
        engine_samples.append(engine)

    train = train_rows(recipe, [f"model.dtype={dtype}", "rollout.engine_mode=multiprocess", "train.problems_per_step=1",
                                "algo.policy_loss=clipped", "algo.advantage=grpo", *extra],
                       steps=steps, threads=threads, out=out, name=dtype, poll=sample)
    mean = lambda k: statistics.mean(r[k] for r in train if k in r) if any(k in r for r in train) else float("nan")
    return {"dtype": dtype, "trainer_peak_gib": peak["trainer"], "engine_peak_gib": peak["engine"],
            "engine_median_gib": statistics.median(engine_samples) if engine_samples else 0.0,
            "trainer_metric_gib": max(r.get("memory/peak_rss_gb", 0.0) for r in train),
            "mismatch_abs": mean("train/mismatch_abs"), "mismatch_k3": mean("train/mismatch_k3"),
            "seconds_per_step": mean("timing/step"), "rows": mean("rollout/train_rows")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-wordmath.yaml"))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="meml-precision-"))
    recs = []
    for dt in a.dtypes.split(","):
        recs.append(run(a.recipe, dt, a.steps, a.threads, a.set, out))
        print(f"[bench] {dt}: {json.dumps(recs[-1])}", flush=True)  # each side as it ends (a run may be cut short)
    print(f"\n{a.recipe}, {a.steps} steps, engine in its own process, {a.threads} threads; logs in {out}")
    print("| dtype | trainer peak PSS GiB | engine processes peak PSS GiB | engine median GiB | memory/peak_rss_gb | "
          "train/mismatch_abs | train/mismatch_k3 | GRPO rows/step | s/step (load-dependent) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in recs:
        print(f"| {r['dtype']} | {r['trainer_peak_gib']:.2f} | {r['engine_peak_gib']:.2f} | "
              f"{r['engine_median_gib']:.2f} | "
              f"{r['trainer_metric_gib']:.2f} | {r['mismatch_abs']:.2e} | {r['mismatch_k3']:.2e} | {r['rows']:.0f} | "
              f"{r['seconds_per_step']:.1f} |")


if __name__ == "__main__":
    main()
