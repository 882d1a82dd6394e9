"""Build a Megatron-Core ``GPTModel`` for the Qwen2 / Qwen2.5 and Llama 3.x families.

Honours TP/PP (from the initialised parallel state), dtype, the layer spec (Transformer Engine when it
imports, else Megatron's local layers with PyTorch SDPA attention) and FP8 settings (Transformer Engine only).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.gpt import gpt_layer_specs as specs
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_meml.errors import UserError
from megatron_meml.model.arch import ArchSpec, rope_inv_freq
from megatron_meml.model.config import ModelConfig
from megatron_meml.model.dtype import resolve_model_dtype
from megatron_meml.model.sdpa_attention import SDPAttention
from megatron_meml.parallel import ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelConfigError(UserError):
    """A model setting that cannot work on this installation or layout."""


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_layer_spec(cfg: ModelConfig, *, have_te: Optional[bool] = None) -> str:
    """'te', 'local' or 'sdpa' ('auto': te when Transformer Engine imports, else sdpa).

    Raises ModelConfigError for FP8 or 'te' without Transformer Engine.
    """
    have_te = te_available() if have_te is None else have_te
    if cfg.fp8 is not None and not have_te:
        raise ModelConfigError(
            f"model.fp8={cfg.fp8} needs Transformer Engine, which is not installed here; install "
            "megatron-meml[gpu] (or use the NGC container), or set model.fp8=null")
    if cfg.layer_spec == "te" and not have_te:
        raise ModelConfigError("model.layer_spec=te needs Transformer Engine, which is not installed here; "
                               "use model.layer_spec=auto, sdpa or local")
    if cfg.fp8 is not None and cfg.layer_spec not in ("auto", "te"):
        raise ModelConfigError(f"model.fp8 needs the Transformer Engine layer spec, not '{cfg.layer_spec}'")
    if cfg.layer_spec == "auto":
        return "te" if have_te else "sdpa"
    return cfg.layer_spec


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken extension counts as absent
        return False
    return True


def fusion_flags(cfg: ModelConfig, *, cuda: bool) -> dict[str, bool]:
    """Megatron's optional fusions: all off on CPU or with model.fused_kernels=false; on CUDA the pure-PyTorch
    ones (torch.compile'd SwiGLU and bias-dropout-add, native fused vocab-parallel cross-entropy) are on, and the
    extension kernels (masked softmax, RoPE) only where their modules import. persist_layer_norm stays off: it is
    apex's LayerNorm kernel and these models use RMSNorm."""
    on = cfg.fused_kernels and cuda
    rope_fusion = False
    if on:
        rope_fusion = rope_utils.fused_apply_rotary_pos_emb is not None
    return dict(
        bias_activation_fusion=on, bias_dropout_fusion=on, cross_entropy_loss_fusion=on,
        masked_softmax_fusion=on and _imports("scaled_masked_softmax_cuda")
        and _imports("scaled_upper_triang_masked_softmax_cuda"),
        apply_rope_fusion=rope_fusion)


def transformer_config(arch: ArchSpec, cfg: ModelConfig, parallel: ParallelConfig):
    """Megatron ``TransformerConfig`` for ``arch`` under ``cfg`` and the parallel layout."""
    arch.check_tp(parallel.tp)
    arch.check_pp(parallel.pp)
    cfg = resolve_model_dtype(cfg)  # a config that did not come through a stage may still say auto
    dtype = _DTYPES[cfg.dtype]
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp, sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=cfg.dtype == "bf16", fp16=cfg.dtype == "fp16",
        use_cpu_initialization=on_cpu, gradient_accumulation_fusion=False, persist_layer_norm=False,
        deallocate_pipeline_outputs=not on_cpu, attention_softmax_in_fp32=True,
        **fusion_flags(cfg, cuda=not on_cpu),
    )
    if cfg.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if cfg.fp8 is not None:
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe, fp8_amax_history_len=cfg.fp8_amax_history_len,
                      fp8_amax_compute_algo="max")
    return TransformerConfig(**kwargs)


def layer_spec(name: str):
    """Megatron ``ModuleSpec`` of one transformer layer: 'te', 'local', or 'sdpa' (the local spec whose core
    attention is ``SDPAttention``; same modules and parameter names otherwise, so checkpoints interchange)."""
    if name == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec()
    if name == "local":
        return specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if name == "sdpa":
        local = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        attn = local.submodules.self_attention
        attn_sub = dataclasses.replace(attn.submodules, core_attention=SDPAttention)
        layer_sub = dataclasses.replace(local.submodules, self_attention=dataclasses.replace(attn, submodules=attn_sub))
        return dataclasses.replace(local, submodules=layer_sub)
    raise ModelConfigError(f"model.layer_spec '{name}' is not available (choose auto, te, local or sdpa)")


def build_model(arch: ArchSpec, cfg: ModelConfig, parallel: ParallelConfig, *, vp_stage: Optional[int] = None):
    """One pipeline stage's ``GPTModel`` (pre/post-process from Megatron's parallel state), on the right device."""
    tcfg = transformer_config(arch, cfg, parallel)
    spec = layer_spec(resolve_layer_spec(cfg))
    first = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = GPTModel(
        config=tcfg, transformer_layer_spec=spec, vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings, pre_process=first, post_process=last,
        parallel_output=True, share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope", rotary_base=int(arch.rope_theta), vp_stage=vp_stage)
    _norms_in_params_dtype(model, tcfg.params_dtype)
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None:  # exact HF inverse frequencies (Llama 3.x scaling included)
        rope.inv_freq = rope_inv_freq(arch).to(rope.inv_freq.device)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def _norms_in_params_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Megatron's torch norms (the sdpa and local specs' ``WrappedTorchNorm``) make their weights in fp32 whatever
    ``params_dtype`` is, and a bf16 activation with an fp32 weight misses torch's fused RMSNorm kernel (4x slower
    forward on CPU). Give them ``params_dtype`` like every other weight (and like TE's norms); the distributed
    optimizer keeps their fp32 main copy, as for the rest."""
    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(dtype)


def unwrap(chunk: Any) -> Any:
    """The ``GPTModel`` that ``build_model`` made, from inside a wrapper (Megatron DDP's ``module``) or bare."""
    return getattr(chunk, "module", chunk)


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """[1, 1, T, T] bool attention mask, True where attention is NOT allowed (Megatron's convention)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
