"""Asynchronous rollouts against on-policy ones: the same `meml train` run with rollout.max_staleness=0 and =1,
side by side (one after another, alternating, never concurrently), on the same recipe, steps and threads.

Prints the median per-phase seconds of each side over steps 2.. (step 1 is on-policy on both sides: nothing was
generated ahead yet) and ends with ``async step ratio N`` (median timing/step, staleness 1 over staleness 0; below
1 means the overlap pays). With the engine in the trainer's process (one rank), the generation runs in a thread on
the same cores as the train phase: on a CPU whose cores both phases saturate, expect no gain; the overlap pays
where the engine has its own devices or cores.

    .venv/bin/python bench/async_step.py                       # the embedded default (toy), 6 steps
    .venv/bin/python bench/async_step.py --recipe R --set model.megatron_path=...   # any RIEL recipe
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_run import ROOT, train_rows  # noqa: E402

PHASES = ("timing/step", "timing/rollout", "timing/train", "timing/rollout_wait", "rollout/overlap_seconds",
          "timing/weight_sync", "rollout/train_rows", "rollout/tokens")


def run_side(recipe: str, staleness: int, steps: int, threads: int, extra: list[str], out: Path, rep: int) -> dict:
    rows = train_rows(recipe, [f"rollout.max_staleness={staleness}", *extra], steps=steps, threads=threads, out=out,
                      name=f"s{staleness}-r{rep}")
    train = [r for r in rows if r["step"] >= 2]
    return {k: [r[k] for r in train if k in r] for k in PHASES} | {
        "staleness": [r.get("rollout/staleness", 0.0) for r in train]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "embedded-default.yaml"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="rounds; each runs both sides once")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for both sides")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="meml-async-bench-"))
    got: dict[int, dict[str, list[float]]] = {0: {}, 1: {}}
    for rep in range(a.repeats):
        for s in (0, 1) if rep % 2 == 0 else (1, 0):
            rec = run_side(a.recipe, s, a.steps, a.threads, a.set, out, rep)
            for k, v in rec.items():
                got[s].setdefault(k, []).extend(v)
            print(f"[bench] round {rep + 1}: max_staleness={s}: median step "
                  f"{statistics.median(rec['timing/step']):.3f} s", flush=True)
    print(f"\n{a.recipe}, {a.steps} steps x {a.repeats} rounds, {a.threads} threads; medians over steps 2..; logs "
          f"in {out}")
    print(f"| phase | max_staleness=0 | max_staleness=1 |\n| --- | --- | --- |")
    for k in PHASES + ("staleness",):
        cells = [f"{statistics.median(got[s][k]):.3f}" if got[s].get(k) else "-" for s in (0, 1)]
        print(f"| {k} | {cells[0]} | {cells[1]} |")
    ratio = statistics.median(got[1]["timing/step"]) / statistics.median(got[0]["timing/step"])
    print(f"async step ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
