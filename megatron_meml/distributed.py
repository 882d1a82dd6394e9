"""Process groups: torch.distributed (gloo on CPU, nccl on GPU) and Megatron's parallel state for a layout."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_meml.parallel import ParallelConfig


def resolve_backend(cfg: ParallelConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: ParallelConfig, timeout_s: int = 600) -> tuple[int, int]:
    """Initialise torch.distributed (env:// from torchrun, or a 1-process group) and Megatron's parallel state.

    Returns (rank, world_size). Raises ValueError when TP x PP does not divide the world size.
    """
    if not dist.is_initialized():
        backend = resolve_backend(cfg)
        if "RANK" not in os.environ:  # single process: a private 1-rank group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
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
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
