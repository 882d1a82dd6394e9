"""The parallel layout (TP, PP, VPP, DP) a recipe asks for; ``distributed.py`` sets it up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Tensor / pipeline / data parallel layout; DP is the world size divided by TP x PP."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None disables."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer state across DP ranks (Megatron distributed optimizer)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo), gloo, nccl."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"parallel.tp and parallel.pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.vpp is not None and self.vpp < 1:
            raise ValueError(f"parallel.vpp must be null or >= 1, got {self.vpp}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tp > 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend must be one of {BACKENDS}, got '{self.backend}'")
