"""Rollouts for every rank from one engine on the rollout rank (global rank 0).

Each data-parallel replica's prompts are submitted by its (TP 0, PP 0) rank, generated together on rank 0, and
every rank of that replica receives the same completions. In a single process this is a direct call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_meml.rollout.backend import SamplingSpec
from megatron_meml.rollout.weight_sync import (ENGINE_DTYPES, ROLLOUT_RANK, collect_hf_weights, sync_weights,
                                              write_hf_dir)
from megatron_meml.types import Completion


class DistributedRollout:
    """Same calls on every rank; the engine exists only on the rollout rank."""

    def __init__(self, engine: Any, chunks: list[Any], arch: Any, *, bucket_mb: int = 256,
                 dtype: Optional[torch.dtype] = None):
        self.engine, self.chunks, self.arch, self.bucket_mb = engine, chunks, arch, bucket_mb
        self.dtype = dtype
        """The engine's parameter dtype: weight syncs send it that (None: the trainer's own dtypes)."""

    @classmethod
    def start(cls, chunks: list[Any], arch: Any, tokenizer: Any, cfg: Any, model_dir: Path, *, dtype: str,
              seed: int) -> "DistributedRollout":
        """Collective: write the current weights as a HF directory and start the engine on the rollout rank."""
        from megatron_meml.rollout.vllm_backend import VLLMBackend

        torch_dtype = ENGINE_DTYPES[dtype]
        named = collect_hf_weights(chunks, arch, bucket_mb=cfg.sync_bucket_mb, dtype=torch_dtype)
        engine = None
        if dist.get_rank() == ROLLOUT_RANK:
            write_hf_dir(model_dir, arch, named, tokenizer, dtype=str(torch_dtype).removeprefix("torch."))
            engine = VLLMBackend(model_dir, cfg, dtype=dtype, max_model_len=arch.max_position_embeddings,
                                 seed=seed)
        if dist.get_world_size() > 1:
            dist.barrier()
        return cls(engine, chunks, arch, bucket_mb=cfg.sync_bucket_mb, dtype=torch_dtype)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        if dist.get_world_size() == 1:
            return self.engine.generate(prompts, spec)
        from megatron.core import parallel_state as ps

        submit = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
        mine = (ps.get_data_parallel_rank(), prompts if submit else None)
        every: list[Optional[tuple]] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        results: dict[int, list[Completion]] = {}
        if dist.get_rank() == ROLLOUT_RANK:
            order = [(d, p) for d, p in every if p is not None]
            flat = self.engine.generate([x for _, p in order for x in p], spec)
            pos = 0
            for d, p in order:
                results[d] = flat[pos:pos + len(p) * spec.n]
                pos += len(p) * spec.n
        box = [results]
        dist.broadcast_object_list(box, src=ROLLOUT_RANK)
        return box[0][mine[0]]

    def sync(self) -> dict[str, float]:
        return sync_weights(self.engine, self.chunks, self.arch, bucket_mb=self.bucket_mb, dtype=self.dtype)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
