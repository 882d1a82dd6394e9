"""How hard each word-arithmetic level is for a model: sampled reward and greedy accuracy per level and expert.

Runs the model on vLLM (the project's rollout backend) with the project's expert prompts, chat template and
verifier, on the same problems for every expert. This is the measurement the real-model recipes choose their
levels from (docs/real_model.md): the easiest level should give tens of percent sampled reward, the RL levels a
few percent.

    .venv/bin/python bench/wordmath_levels.py --model .models/SmolLM2-135M-Instruct --levels 1,2,3,4,5,6,7
"""
from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".models/SmolLM2-135M-Instruct", help="HF model directory")
    ap.add_argument("--levels", default="1,2,3,4,5,6,7")
    ap.add_argument("--experts", default="expert0,expert1,expert2")
    ap.add_argument("--problems", type=int, default=32, help="problems per level (the same for every expert)")
    ap.add_argument("--samples", type=int, default=4, help="sampled responses per problem and expert")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="fp32, bf16, or auto (model.dtype's rule: fp32 on a CPU, bf16 "
                                                    "on a GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch
    from transformers import AutoTokenizer

    from megatron_meml.data.wordmath import generate_problems
    from megatron_meml.experts.expert_set import ExpertSet
    from megatron_meml.experts.config import ExpertsConfig
    from megatron_meml.rewards.score import score
    from megatron_meml.rollout.backend import SamplingSpec
    from megatron_meml.rollout.config import RolloutConfig
    from megatron_meml.rollout.vllm_backend import VLLMBackend

    from megatron_meml.model.dtype import auto_dtype

    torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        args.dtype = auto_dtype()[0]
    ids = args.experts.split(",")
    experts = ExpertSet.from_config(ExpertsConfig(ids=ids, answer_format="the_answer_is"), len(ids),
                                    AutoTokenizer.from_pretrained(args.model))
    engine = VLLMBackend(args.model, RolloutConfig(kv_cache_gb=1.0), dtype=args.dtype, max_model_len=512,
                         seed=args.seed)
    print(f"model {args.model} ({args.dtype}, {args.threads} threads), T={args.temperature}, "
          f"{args.problems} problems x {args.samples} samples per level and expert, "
          f"{args.max_new_tokens} new tokens")
    print("| level | expert | sampled reward | greedy accuracy | truncated | mean tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    t0 = time.perf_counter()
    for level in [int(x) for x in args.levels.split(",")]:
        problems = generate_problems([level], [1.0], args.problems, seed=args.seed, split="bench")
        for e, eid in enumerate(experts.ids):
            prompts = [experts.prompt_ids(e, p) for p in problems]
            k = args.samples
            outs = engine.generate(prompts, SamplingSpec(n=k, temperature=args.temperature,
                                                         max_tokens=args.max_new_tokens, seed=args.seed + level))
            rewards = [score(problems[i // k], o.text, "the_answer_is").reward for i, o in enumerate(outs)]
            greedy = engine.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=args.max_new_tokens))
            acc = [score(p, o.text, "the_answer_is").reward for p, o in zip(problems, greedy)]
            trunc = sum(o.finish_reason == "length" for o in outs) / len(outs)
            toks = sum(len(o.token_ids) for o in outs) / len(outs)
            print(f"| {level} | {eid} | {sum(rewards) / len(rewards):.3f} | {sum(acc) / len(acc):.3f} | "
                  f"{trunc:.2f} | {toks:.0f} |", flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    engine.shutdown()


if __name__ == "__main__":
    main()
