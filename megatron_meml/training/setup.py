"""Model chunks wrapped in Megatron DDP, and the Megatron (distributed) optimizer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_meml.model.arch import ArchSpec
from megatron_meml.model.config import ModelConfig
from megatron_meml.model.provider import build_model, unwrap
from megatron_meml.parallel import ParallelConfig
from megatron_meml.training.config import TrainConfig


@dataclass
class TrainState:
    """What the trainer holds: DDP-wrapped model chunks (one per virtual stage) and the optimizer."""

    model: list[Any]
    """[vpp or 1] DDP-wrapped GPTModel chunks of this pipeline rank."""
    optimizer: Any
    """Megatron optimizer (DistributedOptimizer when parallel.distributed_optimizer)."""


def build_model_chunks(arch: ArchSpec, model_cfg: ModelConfig, parallel: ParallelConfig) -> list[Any]:
    """The unwrapped GPTModel chunks of this rank (several with virtual pipeline stages)."""
    if parallel.vpp is None:
        return [build_model(arch, model_cfg, parallel)]
    return [build_model(arch, model_cfg, parallel, vp_stage=i) for i in range(parallel.vpp)]


def wrap_ddp(chunks: list[Any], parallel: ParallelConfig) -> list[Any]:
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=parallel.distributed_optimizer,
                                            average_in_collective=False)
    return [DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c,
                                    disable_bucketing=(i > 0)) for i, c in enumerate(chunks)]


def build_optimizer(model: list[Any], train: TrainConfig, parallel: ParallelConfig, *, lr: float):
    cfg0 = model[0].config
    ocfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr, weight_decay=train.weight_decay,
                           adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
                           clip_grad=train.grad_clip, bf16=cfg0.bf16, fp16=cfg0.fp16,
                           params_dtype=cfg0.params_dtype,
                           use_distributed_optimizer=parallel.distributed_optimizer)
    optimizer = get_megatron_optimizer(ocfg, model)
    if not torch.cuda.is_available():
        use_fused_cpu_adam(optimizer)
    return optimizer


def use_fused_cpu_adam(optimizer: Any) -> int:
    """Switch the torch Adam(W) inside a Megatron optimizer to torch's fused CPU kernel; returns the param groups
    switched. Without apex / Transformer Engine, Megatron falls back to ``torch.optim.AdamW`` with its defaults,
    which on CPU is the per-tensor loop (``foreach`` is a CUDA default): ~10 element-wise passes over every
    fp32 main parameter and its two moments. The fused kernel does the same update in one pass per tensor
    (measured in docs/performance.md); the update stays AdamW's (tests/distributed/test_ddp_distopt.py)."""
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):  # AdamW subclasses Adam
            continue
        for group in inner.param_groups:
            if not group.get("differentiable") and not group.get("capturable"):
                group.update(fused=True, foreach=False)
                switched += 1
    return switched


def setup_training(arch: ArchSpec, model_cfg: ModelConfig, parallel: ParallelConfig, train: TrainConfig, *,
                   lr: float) -> TrainState:
    """Build, DDP-wrap and attach an optimizer (parallel state must be initialised)."""
    model = wrap_ddp(build_model_chunks(arch, model_cfg, parallel), parallel)
    optimizer = build_optimizer(model, train, parallel, lr=lr)
    # The pipeline schedules call these: DP/TP grad reduction after backward, loss scaling, grad-sync control.
    no_sync = [c.no_sync for c in model]
    for c in model:
        c.config.finalize_model_grads_func = finalize_model_grads
        c.config.grad_scale_func = optimizer.scale_loss
        c.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return TrainState(model=model, optimizer=optimizer)


def build_reference(arch: ArchSpec, model_cfg: ModelConfig, parallel: ParallelConfig, policy: list[Any]) -> list[Any]:
    """The frozen reference policy for ``algo.kl_coef > 0``: this rank's chunks of the same architecture, sharded
    like the policy (same TP/PP/VPP layout, so the same local shapes), holding a copy of the policy's current
    weights (call it before a resume loads later ones: the reference is the RIEL start). No DDP wrapper, no
    optimizer, no gradients: it only runs forward (``Trainer.reference_logprobs``)."""
    chunks = build_model_chunks(arch, model_cfg, parallel)
    for ref, pol in zip(chunks, policy):
        ref.load_state_dict(unwrap(pol).state_dict(), strict=True)
        ref.requires_grad_(False)
        ref.eval()
    return chunks


def zero_grads(state: TrainState) -> None:
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()


def param_count(model: list[Any]) -> int:
    return sum(p.numel() for c in model for p in unwrap(c).parameters())

