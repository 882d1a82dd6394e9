"""Training throughput, MFU and peak memory: megatron_meml's GRPO step vs Megatron-Core's local spec vs HF, one run.

Variants (random weights, same shape, same tokens per optimizer step; each runs in a fresh subprocess):
  a     megatron_meml's GRPO train step as the trainer runs it: training.trainer.Trainer.train_step on a
        TrainBatch of GRPO rows (clipped-ratio loss, old log-probs given), layer spec 'sdpa' with
        model.fused_kernels, Megatron DDP + distributed optimizer, get_forward_backward_func. Log-probs come from
        the output layer's logits through algo.logprobs.vocab_parallel_logprobs (chunked: logits stay in the
        model dtype, fp32 only one chunk at a time).
  ah    as a, with the chunked hidden-state path instead (algo.logprobs.vocab_parallel_logprobs_from_hidden:
        the full-vocabulary logits are never materialised, in any dtype); same loss (algo.losses.clipped_pg_loss),
        own forward step in this file, for comparison.
  b     Megatron-Core's local spec as shipped (no fusions), same DDP/optimizer/schedule, plain LM loss through
        GPTModel's vocab-parallel cross-entropy.
  c     Hugging Face transformers, attn_implementation="sdpa", plain causal-LM loss, torch AdamW, grad clip 1.0.
        On CUDA: fp32 weights under bf16 autocast (what HF Trainer's bf16=True does; fp32 master weights like
        Megatron's mixed precision). On CPU: fp32.
  c16   as c with the weights themselves in bf16 (no fp32 master copy; fewer bytes moved, less precise).
Precision: bf16 on CUDA (a, b: bf16 params, fp32 main params and grads in the optimizer), fp32 on CPU.

One step = --micro-batches forward+backward passes of --micro-batch sequences of --seq tokens, then the
optimizer step. tokens/s = timed steps * tokens per step / wall time (after --warmup untimed steps; CUDA
synchronised). Peak memory: torch.cuda.max_memory_allocated over the whole child (model, optimizer state,
activations); on CPU the child's peak RSS (VmHWM, including the Python/torch/Megatron baseline).

MFU = flops_per_token * tokens/s / peak, flops_per_token = 6 * N + 12 * L * d_attn * S, where N counts the
matmul parameters (every parameter except the input embedding, plus the LM head V * H even when tied),
L = layers, d_attn = heads * head_dim, S = sequence length (causal masking not discounted: PaLM's convention).
mfu_allp counts the input embedding in N as well (N = all parameters, the LM head once more when tied),
the convention behind the MFU figures usually quoted for Megatron-LM. Peak: 989 TFLOP/s (dense bf16, H100/H200 SXM),
or --peak-tflops; not reported on CPU unless --peak-tflops is given.

Usage:
  python bench/train_throughput.py                       # CPU: tiny shape, a b c, one thread per process
  python bench/train_throughput.py --shapes qwen2.5-1.5b,qwen2.5-0.5b --variants a,c,b,c16 --out results.json
  python bench/train_throughput.py --real-model /tmp/smol --threads 2 --steps 1 --repeats 1
                                                         # CPU real-model row: ar vs cr on SmolLM2-135M
  ar    megatron_meml's GRPO train step on the real model (pretrained weights, recipes/smollm2-wordmath.yaml:
        model.dtype auto, paper_pg) on --real-rows rows of 40..300 tokens (what RIEL rollouts produce).
  arp   as ar with the rows packed padding-free (train.max_tokens_per_micro_batch=--pack-tokens, THD layout).
  cr    HF transformers on the same rows as its Trainer runs them: fp32 weights under bf16 autocast, sdpa,
        batches of 8 padded to their longest, fused AdamW. Prints `cpu real-model train ratio N` (arp / cr tokens
        per second), `packed/padded train ratio N` (arp / ar) and each side's GFLOP/s against the matmul peak in
        the row's dtype, measured in the same process.
  The row's dtype is what the recipe's model.dtype: auto picks (megatron_meml.model.dtype): fp32 on both sides on
  a CPU; bf16 (ar bf16 params, cr bf16 autocast) on a GPU.
On CPU, Megatron needs the CPU shim: megatron_meml.model.cpu_compat (tests.megatron_cpu in older trees); it is
never installed when CUDA is available.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_H200_BF16_TFLOPS = 989.0
VARIANTS = {"a": "meml-sdpa-grpo", "ah": "meml-sdpa-grpo-hid", "b": "mcore-local-lm", "c": "hf-sdpa-lm",
            "c16": "hf-sdpa-lm-bf16w", "ar": "meml-real-grpo", "arp": "meml-real-grpo-packed",
            "cr": "hf-real-autocast"}
REAL = ("ar", "arp", "cr")


@dataclass(frozen=True, kw_only=True)
class Shape:
    """A Qwen2-family network shape (random weights)."""

    vocab_size: int
    """Vocabulary size."""
    hidden_size: int
    """Model width H."""
    num_layers: int
    """Transformer layers L."""
    num_attention_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA groups)."""
    head_dim: int
    """Per-head width."""
    ffn_hidden_size: int
    """SwiGLU intermediate size."""
    tie_embeddings: bool
    """Input embedding shared with the LM head."""
    qkv_bias: bool = True
    """q, k, v projections carry a bias (Qwen2: yes; Llama: no)."""

    def params(self) -> dict[str, int]:
        """Parameter counts: 'embedding' (input), 'body' (layers + final norm), 'head' (untied LM head, else 0)."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + (q + 2 * kv) * self.qkv_bias + q * h  # q, k, v (+ qwen2 qkv bias), o
        layer = attn + 3 * h * self.ffn_hidden_size + 2 * h
        emb = self.vocab_size * h
        return {"embedding": emb, "body": self.num_layers * layer + h, "head": 0 if self.tie_embeddings else emb}

    def flops_per_token(self, seq: int, *, all_params: bool = False) -> float:
        p = self.params()
        n = p["body"] + self.vocab_size * self.hidden_size  # matmul params: body + LM head
        if all_params:
            n += p["embedding"]
        return 6.0 * n + 12.0 * self.num_layers * self.num_attention_heads * self.head_dim * seq


SHAPES = {
    "tiny": Shape(vocab_size=4096, hidden_size=256, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                  head_dim=64, ffn_hidden_size=704, tie_embeddings=True),
    "qwen2.5-0.5b": Shape(vocab_size=151936, hidden_size=896, num_layers=24, num_attention_heads=14,
                          num_kv_heads=2, head_dim=64, ffn_hidden_size=4864, tie_embeddings=True),
    "smollm2-135m": Shape(vocab_size=49152, hidden_size=576, num_layers=30, num_attention_heads=9, num_kv_heads=3,
                          head_dim=64, ffn_hidden_size=1536, tie_embeddings=True, qkv_bias=False),
    "qwen2.5-1.5b": Shape(vocab_size=151936, hidden_size=1536, num_layers=28, num_attention_heads=12,
                          num_kv_heads=2, head_dim=128, ffn_hidden_size=8960, tie_embeddings=True),
}


# ----------------------------------------------------------------------------------------------- child side


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _batches(shape: Shape, args, device, seed: int = 0):
    """args.micro_batches micro-batches of (tokens, targets, advantages, loss mask), each [mbs, S] ([mbs])."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(args.micro_batches):
        toks = torch.randint(0, shape.vocab_size, (args.micro_batch, args.seq + 1), generator=g)
        adv = torch.randn(args.micro_batch, generator=g)
        mask = torch.ones(args.micro_batch, args.seq)
        mask[:, : args.seq // 4] = 0  # the prompt part is not scored
        out.append(tuple(t.to(device) for t in (toks[:, :-1].contiguous(), toks[:, 1:].contiguous(), adv, mask)))
    return out


class _HiddenHead(torch.nn.Module):
    """Replaces GPTModel.output_layer: hands back the final hidden states and keeps the LM-head weight it was
    given (the shared embedding when tied), for the chunked log-prob path. Parameters stay where they were."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.weight_used = None

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        self.weight_used = self.inner.weight if weight is None else weight
        return hidden, None


def _grpo_forward_step(data_iterator, model, *, head, normaliser, tp_group):
    """Megatron forward_step_func for (ah): hidden states -> chunked log-probs -> clipped GRPO loss."""
    from megatron_meml.algo.logprobs import vocab_parallel_logprobs_from_hidden
    from megatron_meml.algo.losses import clipped_pg_loss
    from megatron_meml.model.provider import causal_mask

    tokens, targets, adv, mask = next(data_iterator)
    t = tokens.shape[1]
    pos = torch.arange(t, device=tokens.device)[None].expand_as(tokens)
    attn_mask = None if tokens.is_cuda else causal_mask(t)  # SDPA applies is_causal itself on GPU
    hidden = model(tokens, pos, attn_mask)  # [B, S, H] through _HiddenHead

    def loss_func(hidden):
        lp, _ = vocab_parallel_logprobs_from_hidden(hidden, head.weight_used, targets, tp_group)
        loss, metrics = clipped_pg_loss(lp, lp.detach(), adv, mask, normaliser, clip_low=0.2, clip_high=0.28)
        return loss, {"loss": metrics["train/pg_loss"]}

    return hidden, loss_func


def _lm_forward_step(data_iterator, model):
    """Megatron forward_step_func for (b): GPTModel's own vocab-parallel cross-entropy, masked mean."""
    from megatron_meml.model.provider import causal_mask

    tokens, targets, _, mask = next(data_iterator)
    t = tokens.shape[1]
    pos = torch.arange(t, device=tokens.device)[None].expand_as(tokens)
    out = model(tokens, pos, None if tokens.is_cuda else causal_mask(t), labels=targets)

    def loss_func(per_token):
        loss = (per_token.float() * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def _megatron_setup(shape: Shape, spec: str, fused: bool):
    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.distributed import init_distributed
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import setup_training

    if not torch.cuda.is_available():
        try:
            from megatron_meml.model.cpu_compat import install_cpu_shim
        except ImportError:  # trees from before the shim moved into the package
            from tests.megatron_cpu import install_cpu_shim
        install_cpu_shim()
    par = ParallelConfig(distributed_optimizer=True)
    init_distributed(par)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cfg = ModelConfig(family="qwen2", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                      num_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                      num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                      ffn_hidden_size=shape.ffn_hidden_size, max_position_embeddings=32768, rope_theta=1e6,
                      tie_embeddings=shape.tie_embeddings, dtype="bf16" if torch.cuda.is_available() else "fp32",
                      layer_spec=spec, fused_kernels=fused)
    return setup_training(arch_from_model_config(cfg), cfg, par, TrainConfig(grad_clip=1.0), lr=1e-6)


def _trainer_step_fn(shape: Shape, args):
    """(a): (step() = Trainer.train_step on a GRPO TrainBatch already on the device, parameter count)."""
    from megatron_meml.algo.config import AlgoConfig
    from megatron_meml.training.setup import param_count
    from megatron_meml.training.trainer import Trainer
    from megatron_meml.types import TrainBatch

    state = _megatron_setup(shape, "sdpa", fused=True)
    trainer = Trainer(state, AlgoConfig(policy_loss="clipped"), micro_batch_size=args.micro_batch, pad_id=0)
    micro = _batches(shape, args, _device())
    tokens = torch.cat([m[0] for m in micro])
    batch = TrainBatch(tokens=tokens, loss_mask=torch.cat([m[3] for m in micro]),
                       row_kind=torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device),
                       advantages=torch.cat([m[2] for m in micro]),
                       old_logprobs=torch.full(tokens.shape, -8.0, device=tokens.device))

    def step() -> None:
        metrics = trainer.train_step(batch)
        if metrics["train/update_skipped"]:
            raise RuntimeError("Megatron optimizer step was skipped (non-finite gradients)")

    return step, param_count(state.model)


def _megatron_step_fn(variant: str, shape: Shape, args):
    """(ah) or (b): (step() running one optimizer step of args.micro_batches micro-batches, parameter count)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_meml.model.provider import unwrap
    from megatron_meml.training.setup import param_count, zero_grads

    if variant == "a":
        return _trainer_step_fn(shape, args)
    state = _megatron_setup(shape, "sdpa" if variant == "ah" else "local", fused=variant == "ah")
    batches = _batches(shape, args, _device())
    if variant == "ah":
        gpt = unwrap(state.model[0])
        head = _HiddenHead(gpt.output_layer)
        gpt.output_layer = head
        group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        normaliser = float(sum(b[3].sum().item() for b in batches))
        fwd = partial(_grpo_forward_step, head=head, normaliser=normaliser, tp_group=group)
    else:
        fwd = _lm_forward_step
    run = get_forward_backward_func()

    def step() -> None:
        zero_grads(state)
        run(forward_step_func=fwd, data_iterator=iter(batches), model=state.model,
            num_microbatches=len(batches), seq_length=args.seq, micro_batch_size=args.micro_batch,
            forward_only=False)
        ok, _, _ = state.optimizer.step()
        if not ok:
            raise RuntimeError("Megatron optimizer step was skipped (non-finite gradients)")

    return step, param_count(state.model)


def _hf_step_fn(variant: str, shape: Shape, args):
    """(c) / (c16): (step(), parameter count) for HF Qwen2 with SDPA attention, causal-LM loss, torch AdamW."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    dev = _device()
    hf_cfg = Qwen2Config(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                         intermediate_size=shape.ffn_hidden_size, max_position_embeddings=32768,
                         rope_theta=1e6, tie_word_embeddings=shape.tie_embeddings, use_cache=False)
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    if variant == "c16":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches = _batches(shape, args, dev)
    autocast = dev.type == "cuda" and variant == "c"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for tokens, _, _, _ in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=tokens, labels=tokens).loss / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(variant: str, shape_name: str, args) -> dict:
    """Build, warm up, time; returns one result row."""
    torch.set_num_threads(args.threads)
    shape = SHAPES[shape_name]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step, n_params = (_hf_step_fn if variant.startswith("c") else _megatron_step_fn)(variant, shape, args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = time.perf_counter() - t0
    tokens = args.steps * args.micro_batches * args.micro_batch * args.seq
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    return {"variant": variant, "name": VARIANTS[variant], "shape": shape_name, "tokens_per_s": tokens / wall,
            "step_s": wall / args.steps, "params": n_params, "peak_mib": peak, "peak_kind": "cuda_max_allocated" if cuda else "rss_hwm",
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}


# ------------------------------------------------------------------------------- CPU real-model row (ar vs cr)


def _real_rows(args) -> list[tuple[list[int], int]]:
    """--real-rows (token ids, prompt length) rows, totals uniform in [40, 300] tokens as in RIEL rollouts on the
    real model (a 20-48-token prompt, responses from a few tokens to ~250); fixed seed, so both sides get the same."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(args.real_rows):
        n = rng.randint(40, 300)
        rows.append(([rng.randrange(100, 49000) for _ in range(n)], min(rng.randint(20, 48), n - 4)))
    return rows


def _real_meml_step_fn(args, rows, packed: bool = False):
    """(ar): megatron_meml's GRPO step as ``meml train`` runs it on the real model: the smollm2-wordmath recipe
    (model.dtype auto: fp32 on a CPU, bf16 params + fp32 main params on a GPU; paper_pg loss with rollout
    log-probs, micro_batch_size 8), rows through
    batching.to_train_batch (sorted by length) and Trainer.train_step (each micro-batch trimmed to its rows)."""
    from pathlib import Path

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_meml.stages.batching import Row, to_train_batch
    from megatron_meml.config import load_config
    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.cpu_compat import install_cpu_shim
    from megatron_meml.distributed import init_distributed
    from megatron_meml.stages.context import load_hf_weights
    from megatron_meml.training.setup import param_count, setup_training
    from megatron_meml.training.trainer import Trainer

    # these rows have distinct prompts, so the recipe's share_prompts has nothing to share: padded or packed only
    pack = [f"train.max_tokens_per_micro_batch={args.pack_tokens if packed else 0}", "train.share_prompts=false"]
    cfg = load_config(os.path.join(ROOT, "recipes", "smollm2-wordmath.yaml"), [f"model.hf_path={args.real_model}",
                                                                              *pack])
    install_cpu_shim()
    init_distributed(cfg.parallel)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    arch = arch_from_model_config(cfg.model)
    state = setup_training(arch, cfg.model, cfg.parallel, cfg.train, lr=cfg.train.lr)
    load_hf_weights(Path(args.real_model), state.model, arch)
    state.optimizer.reload_model_params()
    trainer = Trainer(state, cfg.algo, micro_batch_size=cfg.train.micro_batch_size, pad_id=0,
                      max_tokens_per_micro_batch=cfg.train.max_tokens_per_micro_batch)
    batch_rows = []
    for i, (toks, p) in enumerate(rows):
        scored = [1.0 if p - 1 <= t < len(toks) - 1 else 0.0 for t in range(len(toks))]
        batch_rows.append(Row(tokens=toks, loss_mask=scored, kind=0, advantage=0.25 + 0.5 * (i % 3),
                              rollout_logprobs=[-1.5 * m for m in scored]))
    batch = to_train_batch(batch_rows, 0)

    def step() -> None:
        if trainer.train_step(batch)["train/update_skipped"]:
            raise RuntimeError("the train step was skipped")

    return step, param_count(state.model)


def _real_hf_step_fn(args, rows):
    """(cr): HF transformers as its Trainer runs by default: fp32 weights under bf16 autocast (plain fp32 where
    ``model.dtype: auto`` picks fp32), sdpa, batches of 8 rows in data order each right-padded to its longest (with
    attention mask), labels -100 on prompt and padding, torch AdamW fused (the Trainer's default optimizer with
    torch >= 2.8), grad clip 1.0."""
    from transformers import AutoModelForCausalLM

    from megatron_meml.model.dtype import auto_dtype

    bf16 = auto_dtype()[0] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(args.real_model, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    batches = []
    for i in range(0, len(rows), 8):
        part = rows[i:i + 8]
        t = max(len(toks) for toks, _ in part)
        ids, att = torch.zeros(len(part), t, dtype=torch.long), torch.zeros(len(part), t, dtype=torch.long)
        labels = torch.full((len(part), t), -100, dtype=torch.long)
        for j, (toks, p) in enumerate(part):
            ids[j, :len(toks)], att[j, :len(toks)] = torch.tensor(toks), 1
            labels[j, p:len(toks)] = torch.tensor(toks[p:])
        batches.append((ids, att, labels))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for ids, att, labels in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=att, labels=labels).loss / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def run_real_child(variant: str, args) -> dict:
    """One side of the real-model row: build, warm up, time; the matmul peak in the row's dtype is measured in this
    process before and after the timed steps (the higher is kept), so it sees the same machine load."""
    from _matmul import matmul_gflops

    from megatron_meml.model.dtype import auto_dtype

    torch.set_num_threads(args.threads)
    rows = _real_rows(args)
    if variant == "cr":
        step, n_params = _real_hf_step_fn(args, rows)
    else:
        step, n_params = _real_meml_step_fn(args, rows, packed=variant == "arp")
    for _ in range(args.warmup):
        step()
    dtype = auto_dtype()[0]
    mm_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    peak = matmul_gflops(mm_dtype, 2048, 2048, 2048)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - t0) / args.steps
    peak = max(peak, matmul_gflops(mm_dtype, 2048, 2048, 2048))
    shape = SHAPES["smollm2-135m"]
    tokens = sum(len(toks) for toks, _ in rows)
    flops = sum(len(toks) * shape.flops_per_token(len(toks)) for toks, _ in rows)  # real tokens only, no padding
    return {"variant": variant, "name": VARIANTS[variant], "shape": "smollm2-135m", "tokens_per_s": tokens / wall,
            "step_s": wall, "tokens": tokens, "gflops": flops / wall / 1e9, "peak_gflops": peak, "dtype": dtype,
            "params": n_params, "peak_mib": _peak_rss_mib(), "peak_kind": "rss_hwm", "device": "cpu",
            "torch": torch.__version__}


def _real_report(rows: dict, args) -> list[str]:
    lines = [f"cpu real-model row: {args.real_model}, {args.real_rows} GRPO rows of 40..300 tokens, "
             f"{args.threads} thread(s), {args.steps} timed step(s) after {args.warmup} warm-up, best of "
             f"{args.repeats}; GFLOP/s = (6*N + 12*L*heads*head_dim*len) per real token (padding not counted)"]
    for v in REAL:
        r = rows.get(v, {"error": "not run"})
        if "error" in r:
            lines.append(f"  {v} {VARIANTS[v]:18} {r['error']}")
            continue
        lines.append(f"  {v} {r['name']:18} {r['tokens_per_s']:8.1f} tok/s  {r['step_s']:7.2f} s/step  "
                     f"{r['gflops']:6.1f} GFLOP/s = {r['gflops'] / r['peak_gflops']:5.1%} of the {r['dtype']} matmul "
                     "peak "
                     f"{r['peak_gflops']:.0f} GFLOP/s (same process)  peak RSS {r['peak_mib']:.0f} MiB")
    ok = {v for v in REAL if "error" not in rows.get(v, {"error": 1})}
    if {"arp", "cr"} <= ok:
        lines.append(f"cpu real-model train ratio {rows['arp']['tokens_per_s'] / rows['cr']['tokens_per_s']:.3f}")
    if {"ar", "arp"} <= ok:
        lines.append(f"packed/padded train ratio {rows['arp']['tokens_per_s'] / rows['ar']['tokens_per_s']:.3f} "
                     f"(--pack-tokens {args.pack_tokens})")
    return lines


def run_real(args) -> list[str]:
    """Parent side of the real-model row: ar and cr interleaved in fresh subprocesses, the best round of each."""
    start, best = time.monotonic(), {}
    for rnd in range(args.repeats):
        for v in args.real_variants.split(","):
            left = args.budget_s - (time.monotonic() - start)
            row = ({"variant": v, "error": "skipped: --budget-s spent"} if left <= 0
                   else _spawn(v, "smollm2-135m", args, min(args.child_timeout_s, left)))
            if v not in best or "error" in best[v] or row.get("tokens_per_s", 0) > best[v].get("tokens_per_s", 0):
                best[v] = row
            done = row["error"] if "error" in row else f"{row['tokens_per_s']:.1f} tokens/s"
            print(f"[{time.monotonic() - start:6.1f}s] round {rnd + 1} real-model {v}: {done}", flush=True)
    return _real_report(best, args)


# ---------------------------------------------------------------------------------------------- parent side


def _spawn(variant: str, shape: str, args, timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--shapes", shape, "--seq", str(args.seq),
           "--micro-batch", str(args.micro_batch), "--micro-batches", str(args.micro_batches),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.real_model:
        cmd += ["--real-model", args.real_model, "--real-rows", str(args.real_rows), "--pack-tokens",
                str(args.pack_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "shape": shape, "error": f"timed out after {timeout_s:.0f}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    kind = "OOM" if "OutOfMemoryError" in p.stderr else f"exit {p.returncode}"
    return {"variant": variant, "shape": shape, "error": f"{kind}: {' | '.join(tail)}"}


def _add_mfu(row: dict, args) -> None:
    shape = SHAPES[row["shape"]]
    peak = args.peak_tflops
    if peak is None and any(k in row.get("device", "") for k in ("H100", "H200")):
        peak = H100_H200_BF16_TFLOPS
    row["peak_tflops"] = peak
    for key, allp in (("mfu", False), ("mfu_allp", True)):
        fl = shape.flops_per_token(args.seq, all_params=allp)
        row[key] = None if peak is None or "tokens_per_s" not in row else fl * row["tokens_per_s"] / (peak * 1e12)


def _fmt(v, spec: str) -> str:
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def _report(rows: list[dict], args) -> list[str]:
    lines = [f"seq {args.seq}, micro-batch {args.micro_batch} x {args.micro_batches} per step, "
             f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} thread(s) per process, "
             f"best of {args.repeats} interleaved round(s)",
             "MFU = (6*N + 12*L*heads*head_dim*S) * tokens/s / peak; N = params except input embedding, LM head "
             "counted even when tied; mfu_allp: N = all params (+ LM head when tied)",
             f"{'shape':14} {'variant':18} {'tokens/s':>10} {'step s':>8} {'mfu':>6} {'mfu_allp':>8} "
             f"{'peak MiB':>10}  device"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:14} {VARIANTS[r['variant']]:18} {r['error']}")
            continue
        lines.append(f"{r['shape']:14} {r['name']:18} {r['tokens_per_s']:10.1f} {r['step_s']:8.3f} "
                     f"{_fmt(r['mfu'], '6.1%')} {_fmt(r['mfu_allp'], '8.1%')} {r['peak_mib']:10.0f}  "
                     f"{r['device']} ({r['peak_kind']})")
    for r in rows:
        want = sum(SHAPES[r["shape"]].params().values())
        if "params" in r and r["params"] != want:
            lines.append(f"WARNING {r['shape']} {r['name']}: model has {r['params']} parameters, the MFU formula "
                         f"assumes {want}")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ok = {r["variant"]: r for r in rows if r["shape"] == shape and "error" not in r}
        for num, den in (("a", "c"), ("a", "b"), ("a", "c16"), ("ah", "a"), ("ah", "c")):
            if num in ok and den in ok:
                t = ok[num]["tokens_per_s"] / ok[den]["tokens_per_s"]
                m = ok[num]["peak_mib"] / ok[den]["peak_mib"]
                lines.append(f"{shape}: {num}/{den} tokens/s ratio {t:.3f}, peak-memory ratio {m:.3f}")
    return lines


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help=f"comma list of {sorted(SHAPES)} (default: tiny on CPU, "
                                                   "qwen2.5-1.5b,qwen2.5-0.5b on CUDA)")
    p.add_argument("--variants", default="a,c,b", help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048 on CUDA, 256 on CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (4 CUDA, 2 CPU)")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=None, help="timed steps (5 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (3 CUDA, 1 CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=None, help="rounds over the variants, best kept (1 CUDA, 2 CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default 989 on H100/H200)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip variants that would start after this")
    p.add_argument("--child-timeout-s", type=float, default=600, help="per-variant subprocess limit")
    p.add_argument("--out", default=None, help="write rows + report lines as JSON here")
    p.add_argument("--real-model", default=None, help="HF dir of SmolLM2-135M(-Instruct): run only the CPU "
                                                          "real-model row (ar vs cr) and its ratio")
    p.add_argument("--real-rows", type=int, default=64, help="rows of the real-model row")
    p.add_argument("--pack-tokens", type=int, default=2048, help="arp: train.max_tokens_per_micro_batch")
    p.add_argument("--real-variants", default=",".join(REAL), help=f"comma list of {list(REAL)} (real-model row)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.shapes = args.shapes or ("qwen2.5-1.5b,qwen2.5-0.5b" if cuda else "tiny")
    args.seq = args.seq or (2048 if cuda else 256)
    args.micro_batch = args.micro_batch or (4 if cuda else 2)
    args.steps = args.steps or (5 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats or (1 if cuda else 2)
    for s in args.shapes.split(","):
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape '{s}' (choose from {sorted(SHAPES)})")
    for v in args.real_variants.split(","):
        if v not in REAL:
            p.error(f"--real-variants: unknown variant '{v}' (choose from {list(REAL)})")
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant '{v}' (choose from {list(VARIANTS)})")
    return args


def main(argv=None) -> None:
    args = _parse(argv)
    if args.child:
        real = args.child in REAL
        row = run_real_child(args.child, args) if real else run_child(args.child, args.shapes, args)
        print("RESULT " + json.dumps(row), flush=True)
        return
    if args.real_model:
        lines = run_real(args)
        print("\n".join(lines))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"report": lines, "args": vars(args)}, f, indent=2)
        return
    start, best = time.monotonic(), {}
    for rnd in range(args.repeats):  # rounds interleave the variants; the best round of each is kept
        for shape in args.shapes.split(","):
            for v in args.variants.split(","):
                left = args.budget_s - (time.monotonic() - start)
                row = ({"variant": v, "shape": shape, "error": "skipped: --budget-s spent"} if left <= 0
                       else _spawn(v, shape, args, min(args.child_timeout_s, left)))
                _add_mfu(row, args)
                prev = best.get((shape, v))
                if prev is None or "error" in prev or row.get("tokens_per_s", 0) > prev.get("tokens_per_s", 0):
                    best[(shape, v)] = row
                done = row["error"] if "error" in row else f"{row['tokens_per_s']:.1f} tokens/s"
                print(f"[{time.monotonic() - start:6.1f}s] round {rnd + 1} {shape} {v}: {done}", flush=True)
    rows = list(best.values())
    lines = _report(rows, args)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "report": lines, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
