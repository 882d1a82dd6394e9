"""``model.dtype: auto``: bf16 on a GPU, fp32 on a CPU.

On a CPU the runs are short (a laptop's demo: tens of optimizer steps at lr 1e-5 to 4e-5), and bf16 weights do
not hold updates that small: the fp32 main weights take them, but the model computes with their bf16 rounding,
which moves only where the summed updates cross a bf16 step. Measured on the styled demo (`make demo`, seed 1234,
a 2-core Intel Xeon with AMX-BF16, 2026-12-07): in bf16 it ran in 4.6 min but learned nothing (held-out accuracy
after RL 0.00 / 0.03 / 0.03 per expert; RL changed 5.6% of the bf16 weights at all, and MEF's loss fell more
slowly at every step), while in fp32 on the same host it ran in 7.5 min and gave the AVX2 host's table exactly
(0.27 / 0.11 / 0.21). The fp32-trained model scores 0.25 / 0.17 / 0.17 when evaluated in bf16: it is training in
bf16, not inference, that loses the gain. On CPUs without bf16 instructions bf16 is also slow: PyTorch runs its
matmuls as a reference loop (1.8 GFLOP/s against 102 in fp32 on a 2-core AVX2 EPYC). ``model.dtype: bf16`` still
runs bf16 on a CPU, e.g. to measure its throughput; the run says which dtype it chose and why.
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
        return "fp32", ("a CPU: this one has native bf16 matmuls, but a short CPU run's updates are mostly below "
                        "bf16's resolution, so it would learn little; model.dtype=bf16 runs it in bf16 anyway")
    return "fp32", ("a CPU without native bf16 matmuls (no AVX512-BF16/AMX), where bf16 matmuls are emulated, "
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
