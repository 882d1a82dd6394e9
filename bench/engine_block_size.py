"""vLLM's KV-cache block size on CPU: the rollout engine alone at vLLM-CPU's default (128) and at ours (32).

Prefix caching shares whole blocks only. At 128 tokens a chat prompt of ~95 tokens (system prompt + question) has
no whole block, so each of the G samples of a prompt prefills it again; at 32 the samples (and prompts under the
same system prompt) share its first whole blocks. Same prompts, seed and threads for both sizes; each size in its
own subprocess (a fresh engine), the sizes in turn, --rounds times.

Prompts: wordmath level 3 with the expert0 system prompt, chat-templated by the project's expert set (the
workload of ``bench/step_vs_trl.py --real``), --problems x --samples completions of --max-new-tokens tokens,
T=0.7, through ``VLLMBackend.generate`` (the project's rollout path). Each child generates --batches batches of
new problems; a batch's time is its ``generate`` call. ``cached/sample`` is how many prompt tokens of each sample
vLLM served from its prefix cache, read in a separate prefill-only pass after a cache reset.

Ends with ``cpu engine block B/A generate ratio N`` (median batch seconds at the second size / at the first).

    .venv/bin/python bench/engine_block_size.py --model .models/SmolLM2-135M-Instruct [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts_for(model: str, n: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from megatron_meml.data.wordmath import generate_problems
    from megatron_meml.experts.expert_set import ExpertSet
    from megatron_meml.experts.config import ExpertsConfig

    experts = ExpertSet.from_config(ExpertsConfig(ids=["expert0"], answer_format="the_answer_is"), 1,
                                    AutoTokenizer.from_pretrained(model))
    problems = generate_problems([3], [1.0], n, seed=seed, split="bench")
    return [ids for _, _, ids in experts.expand(problems)]


def child(a) -> None:
    import torch

    from megatron_meml.model.dtype import auto_dtype
    from megatron_meml.rollout.backend import SamplingSpec
    from megatron_meml.rollout.config import RolloutConfig
    from megatron_meml.rollout.vllm_backend import VLLMBackend

    torch.set_num_threads(a.threads)
    prompts = json.loads(Path(a.prompts).read_text())
    t0 = time.perf_counter()
    engine = VLLMBackend(a.model, RolloutConfig(kv_cache_gb=1.0, block_size=a.child), dtype=auto_dtype()[0],
                         max_model_len=512, seed=0, mode="inprocess")
    startup = time.perf_counter() - t0
    spec = SamplingSpec(n=a.samples, temperature=0.7, top_p=1.0, max_tokens=a.max_new_tokens, seed=1)
    seconds, tokens = [], 0
    for b in range(a.batches):
        batch = prompts[b * a.problems:(b + 1) * a.problems]
        t = time.perf_counter()
        outs = engine.generate(batch, spec)
        seconds.append(time.perf_counter() - t)
        tokens += sum(len(o.token_ids) for o in outs)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine.reset_prefix_cache()
    probe = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:a.problems]],
                                SamplingParams(n=a.samples, max_tokens=1, detokenize=False), use_tqdm=False)
    cached = statistics.mean(o.num_cached_tokens for o in probe)
    engine.shutdown()
    Path(a.json).write_text(json.dumps({"block": a.child, "startup": startup, "seconds": seconds,
                                        "completion_tokens": tokens, "cached_per_sample": cached}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=".models/SmolLM2-135M-Instruct", help="HF model directory")
    p.add_argument("--sizes", default="128,32", help="two block sizes: vLLM-CPU's default, then ours")
    p.add_argument("--rounds", type=int, default=2, help="times both sizes run, in turn")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batches", type=int, default=3, help="batches of new problems per child")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        return child(a)
    sizes = [int(s) for s in a.sizes.split(",")]
    if len(sizes) != 2:
        raise SystemExit(f"--sizes takes two block sizes, got '{a.sizes}'")
    work = Path(tempfile.mkdtemp(prefix="engine_block_size_"))
    prompt_file = work / "prompts.json"
    prompts = prompts_for(a.model, a.problems * a.batches, seed=0)
    prompt_file.write_text(json.dumps(prompts))
    plen = statistics.mean(len(x) for x in prompts)
    print(f"[conditions] {a.model}, {os.cpu_count()} cores, {a.threads} threads, {a.problems} prompts x {a.samples} "
          f"samples x {a.max_new_tokens} tokens per batch, {a.batches} batches per engine, mean prompt {plen:.1f} "
          f"tokens; logs in {work}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), VLLM_LOGGING_LEVEL="WARNING",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs: dict[int, list[dict]] = {s: [] for s in sizes}
    for r in range(a.rounds):
        for s in sizes:
            js, log = work / f"b{s}.{r}.json", work / f"b{s}.{r}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(s), "--model", a.model,
                   "--prompts", str(prompt_file), "--json", str(js), "--problems", str(a.problems),
                   "--samples", str(a.samples), "--batches", str(a.batches),
                   "--max-new-tokens", str(a.max_new_tokens), "--threads", str(a.threads)]
            with log.open("w") as f:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise SystemExit(f"block {s} failed (exit {proc.returncode}); log {log}:\n"
                                 + "\n".join(log.read_text().splitlines()[-20:]))
            rec = json.loads(js.read_text())
            runs[s].append(rec)
            print(f"[round {r + 1}/{a.rounds}] block {s}: batches " + ", ".join(f"{x:.2f}" for x in rec["seconds"])
                  + f" s, startup {rec['startup']:.1f} s, {rec['cached_per_sample']:.1f} prompt tokens cached per "
                    "sample", flush=True)
    print()
    print("| block size | generate s per batch (median) | completion tokens per batch | prompt tokens cached per "
          "sample | engine start s |")
    print("| --- | --- | --- | --- | --- |")
    med = {}
    for s in sizes:
        med[s] = statistics.median(x for rec in runs[s] for x in rec["seconds"])
        toks = statistics.mean(rec["completion_tokens"] / a.batches for rec in runs[s])
        print(f"| {s} | {med[s]:.2f} | {toks:.0f} | {runs[s][0]['cached_per_sample']:.1f} of {plen:.1f} | "
              f"{statistics.median(rec['startup'] for rec in runs[s]):.1f} |")
    print(f"cpu engine block {sizes[1]}/{sizes[0]} generate ratio {med[sizes[1]] / med[sizes[0]]:.3f}")


if __name__ == "__main__":
    main()
