"""Rollouts for every rank from one engine on the rollout rank (global rank 0).

Each data-parallel replica's prompts are submitted by its (TP 0, PP 0) rank, generated together on rank 0, and
every rank of that replica receives the same completions. In a single process this is a direct call.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_meml.rollout.backend import SamplingSpec
from megatron_meml.rollout.vllm_backend import VLLMBackend
from megatron_meml.rollout.weight_sync import (ENGINE_DTYPES, ROLLOUT_RANK, collect_hf_weights,
                                               remove_engine_weights, sync_weights, write_hf_dir)
from megatron_meml.types import Completion


class DistributedRollout:
    """Same calls on every rank; the engine exists only on the rollout rank.

    ``submit`` + ``collect`` is one generation in two halves: with ``overlap`` the rollout rank generates in a
    background thread until ``collect`` (asynchronous rollouts: the trainer trains meanwhile); without it the work
    runs inside ``collect``. Collectives stay on the calling thread, in the same order on every rank. Completions
    carry ``version``, the optimizer steps applied to the engine's weights (one per ``sync``).
    """

    def __init__(self, engine: Any, chunks: list[Any], arch: Any, *, bucket_mb: int = 256,
                 dtype: Optional[torch.dtype] = None, version: int = 0, model_dir: Optional[Path] = None):
        self.engine, self.chunks, self.arch, self.bucket_mb = engine, chunks, arch, bucket_mb
        self.model_dir = model_dir
        """The HF directory the engine started from (rollout rank): its weights are removed at ``shutdown``."""
        self.dtype = dtype
        """The engine's parameter dtype: weight syncs send it that (None: the trainer's own dtypes)."""
        self.version = version
        self._job: Optional[_Job] = None

    @classmethod
    def start(cls, chunks: list[Any], arch: Any, tokenizer: Any, cfg: Any, model_dir: Path, *, dtype: str,
              seed: int, version: int = 0) -> "DistributedRollout":
        """Collective: write the current weights as a HF directory and start the engine on the rollout rank."""
        torch_dtype = ENGINE_DTYPES[dtype]
        named = collect_hf_weights(chunks, arch, bucket_mb=cfg.sync_bucket_mb, dtype=torch_dtype)
        engine = None
        if dist.get_rank() == ROLLOUT_RANK:
            write_hf_dir(model_dir, arch, named, tokenizer, dtype=str(torch_dtype).removeprefix("torch."))
            engine = VLLMBackend(model_dir, cfg, dtype=dtype, max_model_len=arch.max_position_embeddings,
                                 seed=seed)
        if dist.get_world_size() > 1:
            dist.barrier()
        return cls(engine, chunks, arch, bucket_mb=cfg.sync_bucket_mb, dtype=torch_dtype, version=version,
                   model_dir=model_dir if engine is not None else None)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        self.submit(prompts, spec, overlap=False)
        return self.collect()[0]

    @property
    def in_flight(self) -> bool:
        return self._job is not None

    def submit(self, prompts: list[list[int]], spec: SamplingSpec, *, overlap: bool = True) -> None:
        """Collective: hand this replica's prompts to the engine; ``collect`` returns their completions."""
        if self._job is not None:
            raise RuntimeError("rollout: submit() while a generation is in flight; collect() it first")
        dp, order = 0, [(0, prompts)]
        if dist.get_world_size() > 1:
            lead = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
            dp = ps.get_data_parallel_rank()
            every: list[Optional[tuple]] = [None] * dist.get_world_size()
            dist.all_gather_object(every, (dp, prompts if lead else None))
            order = [(d, p) for d, p in every if p is not None]
        flat = [x for _, p in order for x in p]
        engine = self.engine if dist.get_rank() == ROLLOUT_RANK else None
        self._job = _Job(engine, flat, spec, dp=dp, sizes=[(d, len(p)) for d, p in order], version=self.version,
                         background=overlap)

    def collect(self) -> tuple[list[Completion], float]:
        """Collective: (this replica's completions of the last ``submit``, the engine's seconds on them)."""
        job, self._job = self._job, None
        if job is None:
            raise RuntimeError("rollout: collect() without a submit()")
        box = [job.result()]  # on the rollout rank: ({dp: completions}, seconds) or an error message
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=ROLLOUT_RANK)
        if isinstance(box[0], str):
            if job.error is not None:  # the rollout rank raises the engine's own error
                raise job.error
            raise RolloutFailed(box[0])
        by_dp, seconds = box[0]
        return by_dp[job.dp], seconds

    def sleep(self) -> None:
        """Free the engine's GPU memory for the train phase (vLLM sleep mode; a no-op on CPU and when
        rollout.sleep_between_steps is off). ``sync`` wakes it."""
        if self._job is not None:
            raise RuntimeError("rollout: sleep() while a generation is in flight")
        if self.engine is not None:
            self.engine.sleep()

    def sync(self) -> dict[str, float]:
        if self._job is not None:
            raise RuntimeError("rollout: weight sync while a generation is in flight; collect() it first")
        if self.engine is not None:
            self.engine.wake()  # the new weights load into a woken engine
        metrics = sync_weights(self.engine, self.chunks, self.arch, bucket_mb=self.bucket_mb, dtype=self.dtype)
        self.version += 1
        return metrics

    def shutdown(self) -> None:
        if self._job is not None:
            self._job.result()  # let a background generation finish before the engine goes
            self._job = None
        if self.engine is not None:
            self.engine.shutdown()
        if self.model_dir is not None:
            remove_engine_weights(self.model_dir)


class RolloutFailed(RuntimeError):
    """The engine failed on the rollout rank; every rank raises this with its message."""


class _Job:
    """One generation on the rollout rank: run now in a thread (``background``) or when the result is asked for."""

    def __init__(self, engine: Any, prompts: list[list[int]], spec: SamplingSpec, *, dp: int,
                 sizes: list[tuple[int, int]], version: int, background: bool):
        self.engine, self.prompts, self.spec, self.dp, self.sizes = engine, prompts, spec, dp, sizes
        self.version = version
        self.error: Optional[BaseException] = None
        self._out: Any = None
        self._thread: Optional[threading.Thread] = None
        if engine is not None and background:
            self._thread = threading.Thread(target=self._run, name="meml-rollout", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            flat = self.engine.generate(self.prompts, self.spec)
        except Exception as e:  # noqa: BLE001 - handed to every rank by collect()
            self.error = e
            self._out = f"rollout engine failed on rank {ROLLOUT_RANK}: {type(e).__name__}: {e}"
            return
        flat = [dataclasses.replace(c, policy_version=self.version) for c in flat]
        by_dp, pos = {}, 0
        for d, size in self.sizes:
            by_dp[d] = flat[pos:pos + size * self.spec.n]
            pos += size * self.spec.n
        self._out = (by_dp, time.perf_counter() - t0)

    def result(self) -> Any:
        """On the rollout rank: ({dp rank: completions}, seconds) or an error message; elsewhere None."""
        if self.engine is None:
            return None
        if self._thread is not None:
            self._thread.join()
        elif self._out is None:
            self._run()
        return self._out
