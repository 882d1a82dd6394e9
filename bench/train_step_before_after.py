"""Before/after of the trainer's train step on the real model, both in one process and interleaved, best of N.

'before' runs this trainer the way it ran before the real-model efficiency pass: teacher rows inside the batch,
micro-batches filled up to train.micro_batch_size with padding rows, torch's per-tensor AdamW, steps with nothing
scored still stepping the optimizer, and the output layer on every position (prompts and padding included). 'after' is the trainer's default. Cases: a step with no rows (``empty``), a
3-row step of the demo's shape (``long3``: a GRPO row and a mutual-learning pair, ~900 tokens) and 64 GRPO rows.
Prints per-phase seconds and ``<case> before/after total ratio N``.

    .venv/bin/python bench/train_step_before_after.py --model .models/SmolLM2-135M-Instruct --cases empty,long3
"""
import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default=".models/SmolLM2-135M-Instruct", help="HF model directory")
p.add_argument("--recipe", default="recipes/smollm2-wordmath.yaml")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=2)
p.add_argument("--cases", default="empty,long3")
args = p.parse_args()
torch.set_num_threads(args.threads)
from megatron_meml.config import load_config
from megatron_meml.model.cpu_compat import install_cpu_shim
from megatron_meml.distributed import init_distributed
from megatron_meml.model.arch import arch_from_model_config
from megatron_meml.training.setup import setup_training
from megatron_meml.training.trainer import Trainer
import megatron_meml.training.trainer as T
from megatron_meml.stages.context import load_hf_weights
from megatron_meml.stages.batching import Row, to_train_batch
from megatron_meml.training.forward_step import GRPO, STUDENT, TEACHER
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
cfg = load_config(args.recipe, [f"model.hf_path={args.model}"])
install_cpu_shim(); init_distributed(cfg.parallel); torch.manual_seed(0); model_parallel_cuda_manual_seed(0)
arch = arch_from_model_config(cfg.model)
state = setup_training(arch, cfg.model, cfg.parallel, cfg.train, lr=cfg.train.lr)
load_hf_weights(Path(args.model), state.model, arch); state.optimizer.reload_model_params()
new = Trainer(state, cfg.algo, micro_batch_size=cfg.train.micro_batch_size, pad_id=0)
old = Trainer(state, cfg.algo, micro_batch_size=cfg.train.micro_batch_size, pad_id=0, score_teachers_ahead=False)
old.trim_rows = False  # before: every micro-batch filled up to micro_batch_size rows
old.scored_only = False  # before: logits (and their fp32 log-softmax) at every position
groups = state.optimizer.optimizer.param_groups
rng = random.Random(0)
def row(n_prompt, n_resp, kind=GRPO, adv=0.5, pair=-1, lp=True):
    toks = [rng.randrange(100, 49000) for _ in range(n_prompt + n_resp)]
    mask = [0.0] * len(toks); lps = [0.0] * len(toks) if lp else None
    for i in range(n_resp):
        mask[n_prompt - 1 + i] = 1.0
        if lp: lps[n_prompt - 1 + i] = -1.0
    return Row(tokens=toks, loss_mask=mask, kind=kind, advantage=adv, rollout_logprobs=lps, pair=pair)
cases = {"empty": to_train_batch([], 0),
         "long3": to_train_batch([row(140, 160), row(150, 150, STUDENT, 1.0, 0, False), row(145, 150, TEACHER, 0.0, 0, False)], 0),
         "grpo64": to_train_batch([row(rng.randint(30, 60), rng.randint(10, 240)) for _ in range(64)], 0)}
timers = {}
def wrap(obj, attr, key):
    f = getattr(obj, attr)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); timers[key] = timers.get(key, 0) + time.perf_counter() - t; return r
    setattr(obj, attr, g)
wrap(T, "zero_grads", "zero_grads"); wrap(new, "_score_teachers", "teachers_ahead")
for tr in (new, old): wrap(tr, "_schedule", "fwd_bwd")
wrap(state.optimizer, "step", "optimizer")
real_norm = T.step_normalisers
def run(mode, b):
    for g in groups: g.update(fused=(mode == "after"), foreach=False)
    T.step_normalisers = real_norm if mode == "after" else (lambda *a, **k: dataclasses.replace(real_norm(*a, **k), scored=1.0))
    timers.clear(); t = time.perf_counter(); (new if mode == "after" else old).train_step(b)
    return {"total": time.perf_counter() - t, **timers}
res = {}
for name in args.cases.split(","):
    b = cases[name]; run("before", b); run("after", b)  # warm-up
    best = {}
    for _ in range(args.reps):
        for mode in ("before", "after"):
            r = run(mode, b)
            if mode not in best or r["total"] < best[mode]["total"]: best[mode] = r
    res[name] = best
    for mode in ("before", "after"):
        print(name, mode, " ".join(f"{k}={v:.3f}" for k, v in best[mode].items()), flush=True)
    print(name, "before/after total ratio", f"{best['before']['total'] / best['after']['total']:.2f}", flush=True)
print("RESULT", json.dumps(res))
