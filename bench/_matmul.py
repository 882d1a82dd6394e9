"""The matmul rate a bench measures next to its own timings (train_throughput.py, cpu_dtype.py), so that each figure
is read against the machine's speed at that moment."""
from __future__ import annotations

import time

import torch


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int, reps: int = 3) -> float:
    """GFLOP/s of an [m, k] x [k, n] product in ``dtype`` now: best of ``reps`` after one warm-up, at the thread
    count already set."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9
