"""``meml plan``: check a recipe's parallel layout and estimate memory per GPU before any GPU is spent.

What is exact and what is an estimate:

* Parameters per rank, the gradient buffer (fp32, padded as Megatron's ``ParamAndGradBuffer`` pads it for the
  distributed optimizer) and the optimizer state per rank (Adam's two fp32 moments, plus fp32 main params when
  the model is 16-bit, over this rank's shard of each bucket) follow Megatron-Core's layout rules (0.16.1 and
  0.19.2 alike) and are compared element for element with a real model in
  ``tests/distributed/test_plan_measured.py``. The parameter order is the local layer spec's; Transformer Engine
  orders a layer's parameters differently, which moves only the 64-element alignment padding (under 64 elements
  per tensor).
* Activations, logits, the FP8 weight cache, the vLLM engine overhead and the CUDA/NCCL runtime are estimates
  (stated formulas and constants below); treat a headroom under ~10% as "will probably not fit".

Shapes: ``model.hf_path``'s config.json when it is readable here; else the built-in table ``KNOWN_SHAPES``, keyed
by the exact directory name (``/models/Qwen2.5-7B`` -> ``Qwen2.5-7B``), whose entries are the published
config.json fields, fed through the same ``arch_from_hf_config`` as a real file; else the inline shape when
``hf_path`` is unset.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_meml.config import ConfigError, load_config
from megatron_meml.errors import PlanError
from megatron_meml.model.arch import ArchSpec, arch_from_hf_config, arch_from_model_config, load_hf_config

GiB = 1024 ** 3
RUNTIME_OVERHEAD_GIB = 2.5
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers per training process (an estimate)."""
VLLM_OVERHEAD_GIB = 2.0
"""vLLM's non-KV, non-weight memory inside its gpu_memory_utilization share: CUDA graphs, the profile-run
activation peak and the sampler workspace (an estimate)."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 2}
"""Bytes per element of each ``model.dtype``; ``auto`` is bf16 on the GPUs a plan is for."""

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
KNOWN_SHAPES: dict[str, dict] = {
    "Qwen2.5-Math-1.5B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=1536, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
                              vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
                              rope_theta=10000.0, rms_norm_eps=1e-6),
    "Qwen2.5-7B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1000000.0,
                       rms_norm_eps=1e-6),
    "Qwen2.5-32B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=5120, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                        tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1000000.0,
                        rms_norm_eps=1e-5),
    "Llama-3.2-1B-Instruct": dict(architectures=["LlamaForCausalLM"], hidden_size=2048, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                  intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                                  max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                  rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "Llama-3.1-8B": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
    "Llama-3.1-70B": dict(architectures=["LlamaForCausalLM"], hidden_size=8192, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                          tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=500000.0,
                          rms_norm_eps=1e-5, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
}
"""Published config.json fields of the models the recipes name (Instruct variants share their base's shape)."""
for _base in ("Qwen2.5-7B", "Qwen2.5-32B", "Llama-3.1-8B", "Llama-3.1-70B"):
    KNOWN_SHAPES[f"{_base}-Instruct"] = KNOWN_SHAPES[_base]
KNOWN_SHAPES["Qwen2.5-Math-1.5B-Instruct"] = KNOWN_SHAPES["Qwen2.5-Math-1.5B"]



@dataclass(frozen=True, kw_only=True)
class Layout:
    """The machines a job asks for."""

    nodes: int
    """SLURM nodes."""
    gpus_per_node: int
    """GPUs (training processes) per node."""
    gpu_mem_gib: float = 80.0
    """Usable memory per GPU, GiB."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1 or self.gpu_mem_gib <= 0:
            raise PlanError(f"--nodes, --gpus-per-node and --gpu-mem-gb must be positive, got {self.nodes}, "
                            f"{self.gpus_per_node}, {self.gpu_mem_gib}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Param:
    """One parameter tensor of a model chunk, in ``model.parameters()`` order."""

    name: str
    numel: int
    shared_embedding: bool = False
    """Megatron puts a tied embedding copied across pipeline stages in its own DDP bucket."""


@dataclass(frozen=True, kw_only=True)
class StageMemory:
    """Bytes per GPU on one pipeline stage (the worst data-parallel rank of that stage)."""

    stage: int
    params: int
    """Parameter elements on this rank (all virtual chunks)."""
    buffer_numel: int
    """Elements of the padded param/grad buffers (all chunks)."""
    optim_numel: int
    """Elements of this rank's distributed-optimizer shard (the largest over DP ranks)."""
    rows: dict[str, int]
    """Component -> bytes: weights, grads, optimizer, fp8_cache, reference, runtime, activations, logits, vllm."""
    train_peak: int
    """Trainer resident + activations (+ vLLM share when it does not sleep)."""
    rollout_peak: int
    """Trainer resident + vLLM share."""

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.rollout_peak)


@dataclass(kw_only=True)
class Plan:
    """What ``meml plan`` found: the derived layout, per-stage memory, and the reasons a layout fails."""

    arch: ArchSpec
    shape_source: str
    layout: Layout
    dp: int = 0
    seq_len: int = 0
    microbatches: int = 0
    kv_tokens: int = 0
    """Tokens of KV cache each vLLM engine holds (0 when not computed)."""
    stages: list[StageMemory] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# ----------------------------------------------------------------------------------------------- shapes
def resolve_arch(model) -> tuple[ArchSpec, str]:
    """(ArchSpec, where its shape came from) for a ``ModelConfig``; see the module docstring for the order."""
    if not model.hf_path:
        return arch_from_model_config(model), "inline shape (model.*)"
    cfg_file = Path(model.hf_path) / "config.json"
    if cfg_file.is_file():
        return arch_from_hf_config(load_hf_config(model.hf_path), str(cfg_file)), str(cfg_file)
    name = Path(model.hf_path).name
    if name in KNOWN_SHAPES:
        return arch_from_hf_config(KNOWN_SHAPES[name], f"built-in shape of {name}"), f"built-in shape of {name}"
    raise PlanError(f"model.hf_path '{model.hf_path}': no config.json there and '{name}' is not a built-in shape "
                    f"(known: {', '.join(sorted(KNOWN_SHAPES))}); run the planner where the model directory is "
                    "readable, or name the directory after its Hugging Face model")


# ----------------------------------------------------------------------------------------------- parameters
def _layer_params(arch: ArchSpec, tp: int, i: int) -> list[Param]:
    h, d = arch.hidden_size, arch.head_dim
    q, kv, f = arch.num_attention_heads * d, arch.num_kv_heads * d, arch.ffn_hidden_size
    pre = f"decoder.layers.{i}."
    out = [Param(pre + "input_layernorm.weight", h),
           Param(pre + "self_attention.linear_proj.weight", h * q // tp),
           Param(pre + "self_attention.linear_qkv.weight", (q + 2 * kv) // tp * h)]
    if arch.qkv_bias:
        out.append(Param(pre + "self_attention.linear_qkv.bias", (q + 2 * kv) // tp))
    out += [Param(pre + "pre_mlp_layernorm.weight", h),
            Param(pre + "mlp.linear_fc1.weight", 2 * f // tp * h),
            Param(pre + "mlp.linear_fc2.weight", h * f // tp)]
    return out


def chunk_params(arch: ArchSpec, tp: int, pp: int, vpp: int | None, stage: int, chunk: int = 0) -> list[Param]:
    """Parameters of virtual chunk ``chunk`` on pipeline rank ``stage``, in ``model.parameters()`` order."""
    v = vpp or 1
    per = arch.num_layers // (pp * v)
    first, last = stage == 0 and chunk == 0, stage == pp - 1 and chunk == v - 1
    emb = arch.vocab_size // tp * arch.hidden_size
    out: list[Param] = []
    if first:
        out.append(Param("embedding.word_embeddings.weight", emb, shared_embedding=arch.tie_embeddings and not last))
    start = chunk * (arch.num_layers // v) + stage * per
    for i in range(per):
        out += _layer_params(arch, tp, start + i)
    if last:
        out.append(Param("decoder.final_layernorm.weight", arch.hidden_size))
        if not (arch.tie_embeddings and first):
            out.append(Param("output_layer.weight", emb, shared_embedding=arch.tie_embeddings))
    return out


def buffer_shards(params: list[Param], dp: int, distributed_optimizer: bool = True) -> tuple[int, list[int]]:
    """(padded buffer elements, optimizer-shard elements of each DP rank) for one DDP-wrapped chunk.

    Megatron-Core's ``ParamAndGradBuffer`` (0.16.1 and 0.19.2) with ``overlap_grad_reduce=False`` (one bucket,
    except that a tied embedding copied across stages gets its own): parameters go in reverse order, each starts at
    a multiple of 64 elements, each bucket ends at a multiple of lcm(dp, 128); DP rank r owns the r-th of dp equal
    slices of every bucket. Without the distributed optimizer there is no padding and every rank holds all elements.
    """
    if not distributed_optimizer:
        n = sum(p.numel for p in params)
        return n, [n] * dp
    pad = lambda n, k: -(-n // k) * k  # noqa: E731
    spans: list[tuple[int, int]] = []
    buckets: list[tuple[int, int]] = []
    pos = bucket_start = 0
    open_bucket = False
    for p in reversed(params):
        pos = pad(pos, 64)
        if p.shared_embedding and open_bucket:
            pos = pad(pos, math.lcm(dp, 128))
            buckets.append((bucket_start, pos))
            bucket_start = pos
        spans.append((pos, pos + p.numel))
        pos += p.numel
        open_bucket = True
        if p.shared_embedding:
            pos = pad(pos, math.lcm(dp, 128))
            buckets.append((bucket_start, pos))
            bucket_start, open_bucket = pos, False
    if open_bucket:
        pos = pad(pos, math.lcm(dp, 128))
        buckets.append((bucket_start, pos))
    shards = [0] * dp
    for b0, b1 in buckets:
        size = (b1 - b0) // dp
        for r in range(dp):
            lo, hi = b0 + r * size, b0 + (r + 1) * size
            shards[r] += sum(max(0, min(hi, e) - max(lo, s)) for s, e in spans)
    return pos, shards


def optimizer_bytes(shard_numel: int, dtype: str) -> int:
    """Adam exp_avg + exp_avg_sq (fp32) for a shard of ``dtype`` params, plus fp32 main params when 16-bit."""
    return shard_numel * (8 + (4 if DTYPE_BYTES[dtype] < 4 else 0))


@dataclass(frozen=True, kw_only=True)
class RankState:
    """Exact training state of one GPU: its model chunks, DDP buffers and distributed-optimizer shard."""

    params: int
    """Parameter elements (all virtual chunks)."""
    buffer_numel: int
    """Elements of the padded param/grad buffers (one buffer per chunk and parameter dtype)."""
    weight_bytes: int
    """Bytes of the parameters as stored (padded buffers under the distributed optimizer)."""
    shards: list[int]
    """Optimizer-shard elements of each data-parallel rank [dp]."""
    optim_bytes: list[int]
    """Optimizer-state bytes of each data-parallel rank [dp]."""


def rank_state(arch: ArchSpec, par, dtype: str, stage: int, dp: int) -> RankState:
    """The exact state on pipeline rank ``stage`` for ``dp`` data-parallel ranks. Every weight, the norms too, is in
    the model dtype under every layer spec (``provider._norms_in_params_dtype`` for the torch norms)."""
    params = buf = wbytes = 0
    shards, obytes = [0] * dp, [0] * dp
    for c in range(par.vpp or 1):  # one grad buffer per model chunk: every weight has the model dtype
        ps = chunk_params(arch, par.tp, par.pp, par.vpp, stage, c)
        n, sh = buffer_shards(ps, dp, par.distributed_optimizer)
        params += sum(p.numel for p in ps)
        buf += n
        wbytes += (n if par.distributed_optimizer else sum(p.numel for p in ps)) * DTYPE_BYTES[dtype]
        shards = [a + b for a, b in zip(shards, sh)]
        obytes = [a + optimizer_bytes(b, dtype) for a, b in zip(obytes, sh)]
    return RankState(params=params, buffer_numel=buf, weight_bytes=wbytes, shards=shards, optim_bytes=obytes)


# ----------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(arch: ArchSpec, tokens: int, tp: int, sp: bool, dtype_bytes: int,
                           recompute: bool) -> int:
    """Saved activations of one layer for one micro-batch of ``tokens`` tokens (flash attention: no s^2 term).

    Saved tensors: the two RMSNorm inputs and the two linear inputs of width h (split over TP only with sequence
    parallelism), the QKV output, the attention output, the SwiGLU fc1 output (2f) and the fc2 input (f) (split
    over TP). With full recompute only the layer input is kept.
    """
    h, d = arch.hidden_size, arch.head_dim
    q, kv, f = arch.num_attention_heads * d, arch.num_kv_heads * d, arch.ffn_hidden_size
    rep = tokens * h * dtype_bytes / (tp if sp else 1)
    if recompute:
        return int(rep)
    return int(4 * rep + tokens * (2 * q + 2 * kv + 3 * f) * dtype_bytes / tp)


def inflight_chunks(pp: int, vpp: int | None, stage: int, microbatches: int) -> int:
    """Micro-batch x chunk activations held at once on ``stage`` under 1F1B (interleaved when vpp is set)."""
    if vpp is None:
        return min(pp - stage, microbatches)
    return min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, microbatches * vpp)


# ----------------------------------------------------------------------------------------------- checks
def layout_errors(cfg, arch: ArchSpec, layout: Layout) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the parallel layout, the rollout engines and the sequence length."""
    par, ro, errors, warnings = cfg.parallel, cfg.rollout, [], []
    mp = par.tp * par.pp
    if layout.world % mp:
        errors.append(f"world size {layout.world} ({layout.nodes} nodes x {layout.gpus_per_node} GPUs) is not "
                      f"divisible by parallel.tp x parallel.pp = {par.tp} x {par.pp}: TP x PP x DP must equal it")
    for what, n in (("num_attention_heads", arch.num_attention_heads), ("num_kv_heads", arch.num_kv_heads),
                    ("vocab_size", arch.vocab_size), ("ffn_hidden_size", arch.ffn_hidden_size)):
        if n % par.tp:
            errors.append(f"parallel.tp={par.tp} does not divide {what} = {n}")
    stages = par.pp * (par.vpp or 1)
    if arch.num_layers % stages:
        errors.append(f"num_layers = {arch.num_layers} is not divisible by parallel.pp"
                      f"{' x parallel.vpp' if par.vpp else ''} = {stages}")
    if par.tp > layout.gpus_per_node:
        warnings.append(f"parallel.tp={par.tp} spans nodes ({layout.gpus_per_node} GPUs per node): TP traffic "
                        "would cross the network")
    if ro.backend == "vllm":
        rtp = ro.tensor_parallel_size
        if rtp > layout.gpus_per_node or layout.gpus_per_node % rtp:
            errors.append(f"rollout.tensor_parallel_size={rtp} must divide the {layout.gpus_per_node} GPUs of a "
                          "node (a vLLM engine stays inside one node)")
        if arch.num_attention_heads % rtp:
            errors.append(f"rollout.tensor_parallel_size={rtp} does not divide num_attention_heads = "
                          f"{arch.num_attention_heads} (vLLM requires it)")
        if arch.num_kv_heads % rtp and rtp % arch.num_kv_heads:
            errors.append(f"rollout.tensor_parallel_size={rtp} and num_kv_heads = {arch.num_kv_heads}: one must "
                          "divide the other (vLLM splits or replicates KV heads)")
    seq = ro.max_prompt_tokens + ro.max_new_tokens
    if seq > arch.max_position_embeddings:
        errors.append(f"rollout.max_prompt_tokens + rollout.max_new_tokens = {seq} exceeds the model's "
                      f"max_position_embeddings = {arch.max_position_embeddings}")
    if cfg.model.fp8 is not None:
        q, kv, f = (arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim,
                    arch.ffn_hidden_size)
        for what, n in (("hidden_size", arch.hidden_size), ("QKV width / tp", (q + 2 * kv) // par.tp),
                        ("ffn_hidden_size / tp", f // par.tp)):
            if n % 16:
                errors.append(f"model.fp8: Transformer Engine FP8 GEMMs need dimensions divisible by 16; "
                              f"{what} = {n}")
        if cfg.model.layer_spec not in ("auto", "te"):
            errors.append(f"model.fp8 needs model.layer_spec te (or auto with Transformer Engine), not "
                          f"'{cfg.model.layer_spec}'")
    return errors, warnings


def batch_errors(cfg, dp: int) -> tuple[int, list[str], list[str]]:
    """(micro-batches per RIEL step, errors, warnings) of the batch arithmetic for ``dp`` data-parallel ranks."""
    tr, errors, warnings = cfg.train, [], []
    rows = tr.problems_per_step * cfg.algo.num_experts * cfg.rollout.samples_per_expert
    if tr.max_tokens_per_micro_batch > 0:
        return packed_batch_errors(cfg, dp, rows)
    per = dp * tr.micro_batch_size
    if rows % per:
        errors.append(f"train.problems_per_step x algo.num_experts x rollout.samples_per_expert = {rows} "
                      f"sequences per step is not divisible by DP x train.micro_batch_size = {dp} x "
                      f"{tr.micro_batch_size}")
    if tr.sft_batch_size % per:
        errors.append(f"train.sft_batch_size = {tr.sft_batch_size} is not divisible by DP x "
                      f"train.micro_batch_size = {dp} x {tr.micro_batch_size}")
    if cfg.hard_examples.enabled and cfg.hard_examples.capacity % dp:
        errors.append(f"hard_examples.capacity = {cfg.hard_examples.capacity} is not divisible by DP = {dp}")
    micro = max(1, rows // per)
    pp, vpp = cfg.parallel.pp, cfg.parallel.vpp
    if vpp is not None and micro % pp:
        errors.append(f"parallel.vpp needs the micro-batches per step ({micro}) to be a multiple of "
                      f"parallel.pp = {pp} (interleaved 1F1B schedule)")
    if pp > 1 and micro < pp:
        warnings.append(f"{micro} micro-batches per step with parallel.pp = {pp}: most of the pipeline idles")
    return micro, errors, warnings


def packed_batch_errors(cfg, dp: int, rows: int) -> tuple[int, list[str], list[str]]:
    """``batch_errors`` when rows are packed by token budget: micro-batches per step at full-length rows (an upper
    bound), and under PP the check that a full-length row fits the fixed micro-batch length."""
    budget, row_len = cfg.train.max_tokens_per_micro_batch, cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    errors, warnings = [], []
    if cfg.parallel.pp > 1 and budget < row_len:
        errors.append(f"train.max_tokens_per_micro_batch = {budget} is shorter than a full-length row "
                      f"(rollout.max_prompt_tokens + rollout.max_new_tokens = {row_len}); with parallel.pp > 1 "
                      f"every micro-batch has that fixed length (2 rows for a token-level mutual-learning pair)")
    micro = max(1, -(-(-(-rows // dp) * row_len) // budget))
    pp = cfg.parallel.pp
    if pp > 1 and micro < pp:
        warnings.append(f"about {micro} micro-batches per step with parallel.pp = {pp}: most of the pipeline idles")
    return micro, errors, warnings


# ----------------------------------------------------------------------------------------------- memory
def stage_memory(cfg, arch: ArchSpec, dp: int, stage: int, microbatches: int, gpu_mem: float) -> StageMemory:
    """Per-GPU bytes on pipeline ``stage``; see the module docstring for which rows are exact."""
    par, m, ro = cfg.parallel, cfg.model, cfg.rollout
    dbytes = DTYPE_BYTES[m.dtype]
    rs = rank_state(arch, par, m.dtype, stage, dp)
    tokens = (cfg.train.max_tokens_per_micro_batch  # packed: the budget bounds a micro-batch's tokens
              or (ro.max_prompt_tokens + ro.max_new_tokens) * cfg.train.micro_batch_size)
    layers = arch.num_layers // (par.pp * (par.vpp or 1))
    per_layer = layer_activation_bytes(arch, tokens, par.tp, par.sequence_parallel, dbytes, m.recompute)
    acts = per_layer * layers * inflight_chunks(par.pp, par.vpp, stage, microbatches)
    if m.recompute:  # one layer's full activations exist again during its backward
        acts += layer_activation_bytes(arch, tokens, par.tp, par.sequence_parallel, dbytes, False)
    rows = {
        "weights": rs.weight_bytes,
        "grads": rs.buffer_numel * 4,
        "optimizer": max(rs.optim_bytes),
        "fp8_cache": rs.params if m.fp8 is not None else 0,
        "reference": rs.params * dbytes if cfg.algo.kl_coef > 0 else 0,
        "runtime": int(RUNTIME_OVERHEAD_GIB * GiB),
        "activations": acts,
        "logits": tokens * (arch.vocab_size // par.tp) * 6 if stage == par.pp - 1 else 0,
        "vllm": int(ro.gpu_memory_utilization * gpu_mem * GiB) if ro.backend == "vllm" else 0,
    }
    resident = sum(rows[k] for k in ("weights", "grads", "optimizer", "fp8_cache", "reference", "runtime"))
    asleep = ro.sleep_between_steps and ro.max_staleness == 0  # asynchronous rollouts generate during training
    train_peak = resident + rows["activations"] + rows["logits"] + (0 if asleep else rows["vllm"])
    return StageMemory(stage=stage, params=rs.params, buffer_numel=rs.buffer_numel, optim_numel=max(rs.shards),
                       rows=rows,
                       train_peak=train_peak, rollout_peak=resident + rows["vllm"])


def kv_cache_tokens(cfg, arch: ArchSpec, gpu_mem: float) -> int:
    """Tokens of KV cache one vLLM engine holds in its gpu_memory_utilization share (per GPU of the engine)."""
    ro, dbytes = cfg.rollout, DTYPE_BYTES[cfg.model.dtype]
    rtp = ro.tensor_parallel_size
    total_params = sum(p.numel for p in chunk_params(arch, 1, 1, None, 0))
    weights = total_params * dbytes / rtp
    kv_heads = max(1, arch.num_kv_heads // rtp)
    per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * dbytes
    free = ro.gpu_memory_utilization * gpu_mem * GiB - weights - VLLM_OVERHEAD_GIB * GiB
    return max(0, int(free // per_token))


def plan(cfg, layout: Layout) -> Plan:
    """Check ``cfg`` (a MemlConfig) on ``layout`` and estimate memory on every pipeline stage."""
    arch, source = resolve_arch(cfg.model)
    out = Plan(arch=arch, shape_source=source, layout=layout,
               seq_len=cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens)
    out.errors, out.warnings = layout_errors(cfg, arch, layout)
    if out.errors:
        return out
    out.dp = layout.world // (cfg.parallel.tp * cfg.parallel.pp)
    out.microbatches, errs, warns = batch_errors(cfg, out.dp)
    out.errors += errs
    out.warnings += warns
    out.stages = [stage_memory(cfg, arch, out.dp, s, out.microbatches, layout.gpu_mem_gib)
                  for s in range(cfg.parallel.pp)]
    limit = layout.gpu_mem_gib * GiB
    for st in out.stages:
        if st.peak > limit:
            phase = "training" if st.train_peak >= st.rollout_peak else "rollout (trainer state + vLLM share)"
            out.errors.append(f"pipeline stage {st.stage} needs {st.peak / GiB:.1f} GiB per GPU during {phase}, "
                              f"more than the {layout.gpu_mem_gib:g} GiB available")
    if cfg.rollout.backend == "vllm":
        out.kv_tokens = kv_cache_tokens(cfg, arch, layout.gpu_mem_gib)
        engines = layout.world // cfg.rollout.tensor_parallel_size
        want = cfg.train.problems_per_step * cfg.algo.num_experts * cfg.rollout.samples_per_expert
        if out.kv_tokens < out.seq_len:
            out.errors.append(f"the vLLM share (rollout.gpu_memory_utilization = "
                              f"{cfg.rollout.gpu_memory_utilization}) leaves KV cache for {out.kv_tokens} tokens, "
                              f"less than one sequence of {out.seq_len}")
        elif out.kv_tokens < -(-want // engines) * out.seq_len:
            out.warnings.append(f"KV cache holds {out.kv_tokens // out.seq_len} full sequences per engine; a step "
                                f"samples {-(-want // engines)} per engine, so vLLM will run them in waves")
    return out


# ----------------------------------------------------------------------------------------------- report
_ROW_NAMES = (("weights", "weights"), ("grads", "grads (fp32 buffer)"), ("optimizer", "optimizer (dist.)"),
              ("fp8_cache", "fp8 weight cache"), ("reference", "reference model"), ("runtime", "runtime overhead"),
              ("activations", "activations"), ("logits", "logits"), ("vllm", "vLLM share (awake)"))


def format_plan(p: Plan, recipe: str = "") -> str:
    """The human-readable report: layout, one column per pipeline stage, verdict with reasons."""
    a, lay = p.arch, p.layout
    lines = [f"meml plan {recipe}".rstrip(),
             f"model   {a.family}: {a.num_layers} layers, hidden {a.hidden_size}, heads {a.num_attention_heads}/"
             f"{a.num_kv_heads} kv, ffn {a.ffn_hidden_size}, vocab {a.vocab_size} ({p.shape_source})",
             f"layout  {lay.nodes} nodes x {lay.gpus_per_node} GPUs = {lay.world}; {lay.gpu_mem_gib:g} GiB per GPU"]
    if p.stages:
        lines.append(f"        DP {p.dp}; sequence {p.seq_len} tokens; {p.microbatches} micro-batches per step; "
                     f"vLLM KV cache {p.kv_tokens} tokens per engine")
        head = f"{'GiB per GPU':<22}" + "".join(f"{'stage ' + str(s.stage):>10}" for s in p.stages)
        lines += ["", head, "-" * len(head)]
        lines.append(f"{'parameters (M)':<22}" + "".join(f"{s.params / 1e6:>10.1f}" for s in p.stages))
        for key, label in _ROW_NAMES:
            if any(s.rows[key] for s in p.stages):
                lines.append(f"{label:<22}" + "".join(f"{s.rows[key] / GiB:>10.2f}" for s in p.stages))
        lines.append("-" * len(head))
        lines.append(f"{'peak, training':<22}" + "".join(f"{s.train_peak / GiB:>10.2f}" for s in p.stages))
        lines.append(f"{'peak, rollout':<22}" + "".join(f"{s.rollout_peak / GiB:>10.2f}" for s in p.stages))
        lines.append(f"{'headroom':<22}" + "".join(f"{lay.gpu_mem_gib - s.peak / GiB:>10.2f}" for s in p.stages))
    lines += [""] + [f"warning: {w}" for w in p.warnings]
    lines += [f"error: {e}" for e in p.errors]
    lines.append("OK: the layout is valid and fits" if p.ok else "NOT OK: fix the errors above before queueing")
    return "\n".join(lines)


def run_plan(recipe: str, overrides: list[str], nodes: int, gpus_per_node: int, gpu_mem_gb: float) -> int:
    """``meml plan``: print the report; 0 when the layout is valid and fits, 1 when not, 2 on a config error."""
    try:
        cfg = load_config(recipe, overrides)
        p = plan(cfg, Layout(nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=gpu_mem_gb))
    except (ConfigError, PlanError) as e:
        print(f"meml plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(p, recipe))
    return 0 if p.ok else 1
