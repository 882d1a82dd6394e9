"""bf16 vs fp32 on this CPU, side by side in one run: what ``model.dtype: auto`` decides, and why.

1. Matmul rate at the real model's MLP shape (2048 x 576 x 1536, SmolLM2-135M), --threads threads, bf16 and fp32
   interleaved, best of --reps: prints `bf16/fp32 matmul ratio N` (above 1: bf16 is faster here).
2. Unless --no-run: the same short `meml train` of recipes/smollm2-wordmath.yaml (the real-model e2e test's shape:
   2 problems x 3 experts x 4 samples, 48 new tokens, every MEML part on) once with model.dtype=bf16 and once with
   fp32, one after another; prints each side's median step / rollout / train seconds over the steps and
   `real-model bf16/fp32 step ratio N`.
Ends with the dtype `auto` picks on this machine (megatron_meml.model.dtype.auto_dtype) and whether the fastest
measured side agrees with it.

    .venv/bin/python bench/cpu_dtype.py [--threads 2] [--steps 2] [--no-run]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _matmul import matmul_gflops  # noqa: E402
from _train_run import ROOT, train_rows  # noqa: E402

SHAPE = (2048, 576, 1536)
SMALL = ["train.problems_per_step=2", "rollout.samples_per_expert=4", "rollout.max_new_tokens=48",
         "hard_examples.capacity=2", "hard_examples.k_wrong=2", "data.synthetic_size=200"]
"""The real-model e2e test's shape (tests/e2e/test_real_model_riel.py)."""


def main() -> None:
    from megatron_meml.model.dtype import auto_dtype

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model", default=str(ROOT / ".models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--no-run", action="store_true", help="the matmul rates only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rates = {"bf16": [], "fp32": []}
    for _ in range(2):  # interleaved, so both see the same machine load
        for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            rates[name].append(matmul_gflops(dt, *SHAPE, reps=a.reps))
    best = {k: max(v) for k, v in rates.items()}
    print(f"matmul {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, {a.threads} threads: bf16 {best['bf16']:.1f} GFLOP/s, "
          f"fp32 {best['fp32']:.1f} GFLOP/s")
    print(f"bf16/fp32 matmul ratio {best['bf16'] / best['fp32']:.3f}")
    faster = "bf16" if best["bf16"] > best["fp32"] else "fp32"
    if not a.no_run:
        recipe = str(ROOT / "recipes" / "smollm2-wordmath.yaml")
        out = Path(tempfile.mkdtemp(prefix="cpu_dtype_"))
        step = {}
        for dtype in ("fp32", "bf16"):
            rows = train_rows(recipe, [f"model.dtype={dtype}", f"model.hf_path={a.model}", *SMALL],
                              steps=a.steps, threads=a.threads, out=out, name=dtype)
            med = {k: statistics.median(r[f"timing/{k}"] for r in rows) for k in ("step", "rollout", "train")}
            step[dtype] = med["step"]
            print(f"  {dtype}: step {med['step']:.1f} s (rollout {med['rollout']:.1f}, train {med['train']:.1f}), "
                  f"median of {len(rows)} steps")
        print(f"real-model bf16/fp32 step ratio {step['bf16'] / step['fp32']:.3f}")
        faster = "bf16" if step["bf16"] < step["fp32"] else "fp32"
    picked, why = auto_dtype()
    print(f"model.dtype auto picks {picked} here ({why}); measured faster: {faster}"
          f"{'' if picked == faster else ' -- DISAGREES'}")


if __name__ == "__main__":
    main()
