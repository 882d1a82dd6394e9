"""vLLM-CPU's linear kernel (oneDNN with a prepacked weight) against plain ``torch.nn.functional.linear``, side by
side in one process, at the shapes of the toy bench model and of SmolLM2-135M-Instruct.

Why it is asked: vLLM-CPU prepacks every linear weight into a oneDNN handle and drops the parameter, so each weight
sync rebuilds the handles through vLLM's layerwise reload (on the toy, about a third of the sync's 26 ms). A layer on
``F.linear`` would keep its weight, and a sync could copy into it in place. That pays only if ``F.linear`` is as fast
where the time goes: in the engine's decode steps (M = rows in flight) and prefills (M = prompt tokens).

Each shape: the same random weight and input, ``--reps`` calls of each kernel after 3 warm-up calls, the two
alternated per shape. Prints per-shape milliseconds and, per model and M, the summed time of one layer's linears
(qkv, o, gate_up, down) plus the output layer, ending with ``engine linear F.linear/oneDNN <model> M=<m> ratio N``
(above 1: oneDNN is faster).

Usage:  .venv/bin/python bench/engine_linear.py [--threads 2] [--reps 50]
"""
from __future__ import annotations

import argparse
import os
import time

# N x K of the linears a decoder layer runs (fused qkv, o, fused gate_up, down) and the output layer
SHAPES = {
    # hidden 128, 4 heads x 32 + 2 KV heads, ffn 256, vocab 64 (bench/step_vs_trl.py's toy)
    "toy": [(256, 128), (128, 128), (512, 128), (128, 256), (64, 128)],
    # hidden 576, 9 heads x 64 + 3 KV heads, ffn 1536, vocab 49,152
    "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)],
}
ROWS = {"toy": (8, 64, 1500), "smollm2-135m": (8, 64, 800)}
"""M per model: a few rows decoding, a full batch of 64 decoding, a prefill of the batch's prompts."""


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--models", default="toy,smollm2-135m")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    import torch.nn.functional as F
    from vllm import _custom_ops as ops

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"[conditions] {a.threads} threads, fp32, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}")
    for model in a.models.split(","):
        for m in ROWS[model]:
            tot = {"onednn": 0.0, "F.linear": 0.0}
            for n, k in SHAPES[model]:
                w, x = torch.randn(n, k), torch.randn(m, k)
                handle = ops.create_onednn_mm(w.t(), 32)  # what vLLM-CPU's dispatch builds for a linear layer
                assert torch.allclose(ops.onednn_mm(handle, x, None), F.linear(x, w), rtol=1e-4, atol=1e-4 * k)
                reps = max(3, a.reps if m * n * k < 1e8 else a.reps // 10)
                t_o = timed(lambda: ops.onednn_mm(handle, x, None), reps)
                t_f = timed(lambda: F.linear(x, w), reps)
                tot["onednn"] += t_o
                tot["F.linear"] += t_f
                print(f"{model} M={m} N={n} K={k}: oneDNN {t_o:.4f} ms, F.linear {t_f:.4f} ms, "
                      f"ratio {t_f / t_o:.2f}")
            print(f"engine linear F.linear/oneDNN {model} M={m} ratio {tot['F.linear'] / tot['onednn']:.2f} "
                  f"(one layer + output layer: oneDNN {tot['onednn']:.3f} ms, F.linear {tot['F.linear']:.3f} ms)")


if __name__ == "__main__":
    main()
