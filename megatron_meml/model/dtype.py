"""``model.dtype: auto``: bf16 where the hardware runs bf16 matmuls natively, fp32 where it would emulate them.

bf16 halves the model's memory and, on a GPU or a CPU with bf16 dot-product instructions, is the fast path
(2048x576x1536 at 2 threads on an AVX512-BF16 EPYC: 965 GFLOP/s bf16 vs 206 fp32). On a CPU without them, PyTorch
dispatches bf16 matmuls to a reference loop instead of oneDNN: 1.8 GFLOP/s against 102 in fp32 on a 2-core AVX2
EPYC, where a 2-step RIEL run of SmolLM2-135M took 7.5 minutes in bf16 and 2.2 in fp32. Laptops and many cloud
CPUs are of that kind, so the CPU recipes ask for ``auto`` and the run says which dtype it chose.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from megatron_meml.model.config import ModelConfig

log = logging.getLogger("megatron_meml")


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 matmul instructions that PyTorch uses: AVX512-BF16 or AMX on x86 (the oneDNN
    kernels vLLM's CPU backend also keys on), or oneDNN's bf16 path on Arm (FEAT_BF16)."""
    try:
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
        if torch.cpu._is_avx2_supported():  # x86 without those: oneDNN's bf16 check is its AVX512 emulation
            return False
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes: assume the slow case
        return False


def auto_dtype(*, cuda: Optional[bool] = None, bf16_native: Optional[bool] = None) -> tuple[str, str]:
    """(the dtype ``auto`` means on this machine, why)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return "bf16", "CUDA"
    native = cpu_bf16_native() if bf16_native is None else bf16_native
    if native:
        return "bf16", "this CPU has native bf16 matmuls"
    return "fp32", ("this CPU has no native bf16 matmuls (no AVX512-BF16/AMX), where bf16 matmuls are emulated, "
                    "50-90x slower than fp32")


def resolve_model_dtype(cfg: ModelConfig, **probe) -> ModelConfig:
    """``cfg`` with ``dtype: auto`` replaced by the concrete dtype for this machine (logged); others unchanged.
    ``probe`` (cuda=, bf16_native=) overrides the hardware checks, for tests."""
    if cfg.dtype != "auto":
        return cfg
    dtype, why = auto_dtype(**probe)
    log.info("model.dtype=auto -> %s (%s)", dtype, why)
    return dataclasses.replace(cfg, dtype=dtype)


def for_this_machine(cfg: Any) -> Any:
    """A run's config (``MemlConfig``) with the settings that depend on the hardware made concrete; every stage
    (``meml sft|train|eval|traces``) runs on this, so the run directory's config file records what was chosen."""
    return dataclasses.replace(cfg, model=resolve_model_dtype(cfg.model))
