"""Parallel layout config and Megatron parallel-state set-up/teardown (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
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


def resolve_backend(cfg: ParallelConfig) -> str:
    import torch

    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: ParallelConfig, timeout_s: int = 600) -> tuple[int, int]:
    """Initialise torch.distributed (env:// from torchrun, or a 1-process group) and Megatron's parallel state.

    Returns (rank, world_size). Raises ValueError when TP x PP does not divide the world size.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        backend = resolve_backend(cfg)
        if "RANK" not in os.environ:  # single process: a private 1-rank group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (cfg.tp * cfg.pp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp x parallel.pp = {cfg.tp} x {cfg.pp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp,
            pipeline_model_parallel_size=cfg.pp,
            virtual_pipeline_model_parallel_size=cfg.vpp,
        )
    return dist.get_rank(), world


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the process group (barrier first)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
