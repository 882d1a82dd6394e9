"""One GRPO train step on the real model in each micro-batch layout and CPU attention kernel, interleaved in one
process on the same rows and weights, best of N.

Layouts: ``padded`` (train.max_tokens_per_micro_batch=0: rows sorted by length, micro_batch_size rows padded to the
longest), ``packed`` (train.max_tokens_per_micro_batch, one THD sequence per row) and ``shared`` (packed +
train.share_prompts: the G rows of a prompt share one copy of it; the smollm2 RIEL recipes' layout). Kernels: ``math`` (fp32 matmuls + softmax for attention over at most
``sdpa_attention.CPU_MATH_MAX_KEYS`` keys, the default on CPU) and ``flash`` (PyTorch's CPU flash kernel for every
call, as before). Rows: ``--prompts`` prompts of ``--prompt-len`` tokens, ``--group`` responses each of 20-82 tokens
(the shape of ``bench/step_vs_trl.py --real``: 8 x 8 rows, ~95 + ~51 tokens). Prints seconds per step for each
(layout, kernel), ``<layout> math/flash step ratio N`` and ``shared/padded step ratio N`` (math kernel).
``--norms bf16,fp32`` adds a second model whose RMSNorm weights stay fp32 (as Megatron's torch norms made them before
``provider._norms_in_params_dtype``) and prints ``<layout> bf16/fp32 norms step ratio N`` (math kernel).

    .venv/bin/python bench/train_step_layouts.py --model .models/SmolLM2-135M-Instruct --reps 2
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default=".models/SmolLM2-135M-Instruct", help="HF model directory")
p.add_argument("--recipe", default="recipes/smollm2-wordmath.yaml")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=2, help="rounds over the (layout, kernel) pairs; the best is kept")
p.add_argument("--layouts", default="padded,packed,shared")
p.add_argument("--kernels", default="math,flash")
p.add_argument("--prompts", type=int, default=8)
p.add_argument("--group", type=int, default=8, help="responses per prompt")
p.add_argument("--prompt-len", type=int, default=95)
p.add_argument("--pack-tokens", type=int, default=2048, help="train.max_tokens_per_micro_batch of packed/shared")
p.add_argument("--norms", default="bf16", help="comma list of bf16 (the default) and fp32 (norm weights kept fp32)")
p.add_argument("--out", default=None, help="write the seconds and ratios as JSON here")
args = p.parse_args()
torch.set_num_threads(args.threads)

from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

import megatron_meml.model.sdpa_attention as sdpa  # noqa: E402
from megatron_meml.stages.batching import Row, to_train_batch  # noqa: E402
from megatron_meml.config import load_config  # noqa: E402
from megatron_meml.model.arch import arch_from_model_config  # noqa: E402
from megatron_meml.model.cpu_compat import install_cpu_shim  # noqa: E402
from megatron_meml.distributed import init_distributed  # noqa: E402
from megatron_meml.stages.context import load_hf_weights  # noqa: E402
from megatron_meml.training.setup import setup_training  # noqa: E402
from megatron_meml.training.trainer import Trainer  # noqa: E402

cfg = load_config(args.recipe, [f"model.hf_path={args.model}", "algo.advantage=grpo", "algo.policy_loss=clipped"])
install_cpu_shim()
init_distributed(cfg.parallel)
torch.manual_seed(0)
model_parallel_cuda_manual_seed(0)
arch = arch_from_model_config(cfg.model)
norms = args.norms.split(",")


def build_state(norm_dtype: str):
    import megatron_meml.model.provider as provider

    keep = provider._norms_in_params_dtype
    if norm_dtype == "fp32":
        provider._norms_in_params_dtype = lambda model, dtype: None
    try:
        state = setup_training(arch, cfg.model, cfg.parallel, cfg.train, lr=cfg.train.lr)
    finally:
        provider._norms_in_params_dtype = keep
    load_hf_weights(Path(args.model), state.model, arch)
    state.optimizer.reload_model_params()
    return state


states = {n: build_state(n) for n in norms}
rng = random.Random(0)
rows = []
for g in range(args.prompts):
    prompt = [rng.randrange(100, 49000) for _ in range(args.prompt_len)]
    for s in range(args.group):
        toks = prompt + [rng.randrange(100, 49000) for _ in range(rng.randint(20, 82))]
        scored = [1.0 if args.prompt_len - 1 <= t < len(toks) - 1 else 0.0 for t in range(len(toks))]
        rows.append(Row(tokens=toks, loss_mask=scored, kind=0, advantage=0.5 * ((s % 3) - 1),
                        rollout_logprobs=[-1.5 * m for m in scored]))
batch = to_train_batch(rows, 0)
mb = cfg.train.micro_batch_size


def make_trainers(state):
    return {"padded": Trainer(state, cfg.algo, micro_batch_size=mb, pad_id=0),
            "packed": Trainer(state, cfg.algo, micro_batch_size=mb, pad_id=0,
                              max_tokens_per_micro_batch=args.pack_tokens),
            "shared": Trainer(state, cfg.algo, micro_batch_size=mb, pad_id=0,
                              max_tokens_per_micro_batch=args.pack_tokens, share_prompts=True)}


trainers = {n: make_trainers(st) for n, st in states.items()}
layouts, kernels = args.layouts.split(","), args.kernels.split(",")
default_keys = sdpa.CPU_MATH_MAX_KEYS
best: dict = {}
tokens: dict = {}
for rep in range(args.reps):
    for layout in layouts:
        for kernel in kernels:
            for norm in norms:
                if norm != norms[0] and kernel != "math":
                    continue  # the norm comparison runs on the default kernel only
                sdpa.CPU_MATH_MAX_KEYS = default_keys if kernel == "math" else 0
                t = time.perf_counter()
                out = trainers[norm][layout].train_step(batch)
                dt = time.perf_counter() - t
                key = f"{layout}/{kernel}" + ("" if norm == "bf16" else f"/{norm}-norms")
                best[key] = min(best.get(key, dt), dt)
                tokens[layout] = out.get("train/model_tokens")
                print(f"[rep {rep}] {key}: {dt:.2f} s ({tokens[layout]:.0f} model tokens)", flush=True)
sdpa.CPU_MATH_MAX_KEYS = default_keys
print(f"rows {len(rows)}, threads {args.threads}, best of {args.reps}:")
for key, sec in best.items():
    print(f"  {key:14s} {sec:7.2f} s/step")
ratios = {}
if "math" in kernels and "flash" in kernels and norms[0] == "bf16":
    for layout in layouts:
        ratios[f"{layout} math/flash step ratio"] = best[f"{layout}/math"] / best[f"{layout}/flash"]
if "math" in kernels and "bf16" in norms and "fp32" in norms:
    for layout in layouts:
        ratios[f"{layout} bf16/fp32 norms step ratio"] = best[f"{layout}/math"] / best[f"{layout}/math/fp32-norms"]
if "math" in kernels and "shared" in layouts and "padded" in layouts and "bf16" in norms:
    ratios["shared/padded step ratio"] = best["shared/math"] / best["padded/math"]
for name, value in ratios.items():
    print(f"{name} {value:.3f}")
if args.out:
    Path(args.out).write_text(json.dumps({"seconds": best, "model_tokens": tokens, "ratios": ratios}, indent=1))
