"""Peak memory and time: naive full-vocabulary log_softmax + gather vs megatron_meml.algo.logprobs.

Two paths, each forward + backward of sum_n g_n * log p(target_n) on one thread:
  hidden: hidden [N, H] and output weight [V, H] -> log-probs (the trainer's last-stage path);
          naive = log_softmax(hidden @ weight.T).gather; ours = vocab_parallel_logprobs_from_hidden.
  logits: logits [N, V] given -> log-probs; naive = log_softmax(logits).gather; ours = vocab_parallel_logprobs.

Method: every variant runs in a fresh subprocess. After its inputs exist, the kernel's RSS high-water
mark is reset (write 5 to /proc/self/clear_refs) and the baseline RSS is read; after the timed
forward + backward, the peak is read from VmHWM in /proc/self/status. "added" = peak - baseline: the
memory the log-prob computation itself needs (its activations, temporaries and the input gradients),
excluding the inputs that both variants share. Time is the best of --repeats runs.
The last two lines compare the hidden path (ours / naive): `peak ratio` on added memory, `time ratio`.

Usage: python bench/logprob_memory.py [--tokens 4096] [--hidden 1536] [--vocab 151936] [--chunk 256]
(about 6 minutes and 10 GiB of RAM at the defaults on one CPU thread)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("hidden_naive", "hidden_ours", "logits_naive", "logits_ours")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (this bench needs Linux)")


def _reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _run_variant(name: str, args: argparse.Namespace) -> dict:
    import torch

    from megatron_meml.algo.logprobs import vocab_parallel_logprobs, vocab_parallel_logprobs_from_hidden

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    targets = torch.randint(0, v, (n,))
    g = torch.randn(n)
    if name.startswith("hidden"):
        hidden = torch.randn(n, h).requires_grad_()
        weight = (torch.randn(v, h) * h ** -0.5).requires_grad_()
        inputs = (hidden, weight)
    else:
        logits = (torch.randn(n, v) * 2).requires_grad_()
        inputs = (logits,)

    def step() -> None:
        for t in inputs:
            t.grad = None
        if name == "hidden_naive":
            lp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
        elif name == "hidden_ours":
            lp, _ = vocab_parallel_logprobs_from_hidden(hidden, weight, targets, chunk_size=args.chunk)
        elif name == "logits_naive":
            lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        else:
            lp, _ = vocab_parallel_logprobs(logits, targets, chunk_size=args.chunk)
        (lp * g).sum().backward()

    best = float("inf")
    baseline_kib = peak_kib = 0
    for _ in range(args.repeats):
        for t in inputs:
            t.grad = None
        _reset_high_water()
        base = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
        peak = _rss_kib("VmHWM")
        if peak - base > peak_kib - baseline_kib:
            baseline_kib, peak_kib = base, peak
    return {"variant": name, "time_s": best, "baseline_mib": baseline_kib / 1024, "peak_mib": peak_kib / 1024,
            "added_mib": (peak_kib - baseline_kib) / 1024}


def _spawn(name: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--variant", name, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"variant {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens N in the micro-batch")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size H (Qwen2.5-1.5B: 1536)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary V (Qwen2.5: 151,936)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per chunk for ours")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per variant (best time is kept)")
    p.add_argument("--paths", default="hidden,logits", help="comma list of hidden, logits")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.variant:
        print(json.dumps(_run_variant(args.variant, args)))
        return
    print(f"N={args.tokens} tokens, H={args.hidden}, V={args.vocab}, chunk={args.chunk}, fp32, 1 thread, "
          f"forward+backward, best of {args.repeats}; memory = RSS high-water (VmHWM) above the RSS with "
          f"inputs allocated, each variant in a fresh process")
    paths = [x for x in args.paths.split(",") if x]
    ratios = {}
    for path in paths:
        naive, ours = _spawn(f"{path}_naive", args), _spawn(f"{path}_ours", args)
        for r in (naive, ours):
            print(f"{r['variant']:>13}: time {r['time_s']:8.2f} s   added peak {r['added_mib']:9.1f} MiB   "
                  f"(process peak {r['peak_mib']:9.1f} MiB, inputs-ready RSS {r['baseline_mib']:9.1f} MiB)")
        ratios[path] = (ours["added_mib"] / naive["added_mib"], ours["time_s"] / naive["time_s"])
        print(f"{path} path: peak ratio {ratios[path][0]:.3f}, time ratio {ratios[path][1]:.3f}, "
              f"process-peak ratio {ours['peak_mib'] / naive['peak_mib']:.3f}")
    main_path = "hidden" if "hidden" in ratios else paths[0]
    print(f"ratios below: {main_path} path, ours / naive")
    print(f"peak ratio {ratios[main_path][0]:.3f}")
    print(f"time ratio {ratios[main_path][1]:.3f}")


if __name__ == "__main__":
    main()
