"""Stream tensors into and out of a Megatron-Core ``torch_dist`` checkpoint without building a model.

The on-disk format is exactly what ``megatron.core.dist_checkpointing.save`` writes with its default backend:
a PyTorch Distributed Checkpoint (``.metadata`` + ``*.distcp``) whose keys are Megatron's sharded keys (layer
parameters stacked on a leading layer axis of global size ``num_layers``), ``common.pt`` and ``metadata.json``.
Megatron loads it at any TP/PP because every rank reads its own slice of the global tensors.

Streaming: the writer is a DCP ``SavePlanner`` whose ``resolve_data`` produces each chunk on demand and the
writer puts every chunk in its own file, so only the chunk being written (and the full tensor it is cut
from) is alive; the reader asks DCP for one layer's chunks at a time.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, ReadItem, SavePlan, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from checkpoints_convert.mapping import ConvertError

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One stored piece of a global tensor."""

    key: str
    """Dist-checkpoint key."""
    global_shape: tuple[int, ...]
    """Shape of the whole tensor (layer axis first for layer parameters)."""
    offsets: tuple[int, ...]
    """Where this chunk starts in the global tensor."""
    sizes: tuple[int, ...]
    """Chunk shape."""
    dtype: torch.dtype
    """Stored dtype."""
    produce: Callable[[], torch.Tensor]
    """Returns the chunk's data (shape ``sizes``); called once, while writing."""


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans the given chunks and None-valued objects; materialises each chunk only when DCP writes it."""

    def __init__(self, chunks: list[Chunk], objects: dict[str, Any]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, c.offsets): c for c in chunks}
        self._order = chunks
        self._objects = objects

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(c.key, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(
                               chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                               properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape)))
                 for c in self._order]
        items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn]], buf)  # Megatron stores a list of object shards
            buf.seek(0)
            return buf
        c = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = c.produce()
        if tuple(t.shape) != c.sizes:
            raise ConvertError(f"{c.key} at {c.offsets}: produced shape {tuple(t.shape)}, expected {c.sizes}")
        return t.to(c.dtype).contiguous()


def write_checkpoint(out: Path, chunks: list[Chunk], objects: dict[str, Any]) -> None:
    """Write a Megatron ``torch_dist`` checkpoint holding ``chunks`` (streamed) and ``objects`` into ``out``."""
    writer = dcp.FileSystemWriter(str(out), single_file_per_rank=False, thread_count=1)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({}, storage_writer=writer, planner=_StreamingSavePlanner(chunks, objects), no_dist=True)
    torch.save({}, out / "common.pt")
    (out / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))


def read_metadata(ckpt: Path) -> Metadata:
    """DCP metadata of a Megatron checkpoint directory, with a clear error when it is not one."""
    if not ckpt.is_dir():
        raise ConvertError(f"Megatron checkpoint directory '{ckpt}' does not exist; pass the --out directory of "
                           "hf-to-megatron or a model checkpoint directory that a run saved")
    meta = ckpt / "metadata.json"
    if not (ckpt / ".metadata").is_file() or not meta.is_file():
        raise ConvertError(f"'{ckpt}' is not a Megatron dist checkpoint (no .metadata / metadata.json)")
    backend = json.loads(meta.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise ConvertError(f"{meta}: sharded_backend '{backend}' is not supported (only torch_dist)")
    return dcp.FileSystemReader(str(ckpt)).read_metadata()


# What reading a damaged checkpoint raises: DCP's per-rank wrapper, torch.load's RuntimeError, a short read.
READ_ERRORS = (CheckpointException, RuntimeError, OSError, EOFError)


def unreadable(ckpt: Path | str, e: BaseException) -> ConvertError:
    """One-line error for a checkpoint whose files cannot be read (``e``: one of READ_ERRORS, or Megatron's)."""
    failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
    if failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    why = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return ConvertError(f"Megatron checkpoint '{ckpt}' cannot be read ({type(e).__name__}: {why}): a file in it is "
                        "missing, truncated or corrupt; write the checkpoint again")


def tensor_meta(md: Metadata, key: str) -> TensorStorageMetadata:
    try:
        tm = md.state_dict_metadata[key]
    except KeyError:
        raise ConvertError(f"tensor '{key}' is missing from the Megatron checkpoint") from None
    if not isinstance(tm, TensorStorageMetadata):
        raise ConvertError(f"checkpoint entry '{key}' is not a tensor")
    return tm


class _ChunkLoadPlanner(LoadPlanner):
    """Reads the requested (key, offsets, sizes) regions into fresh tensors of the stored dtype."""

    def __init__(self, requests: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        self._requests = requests
        self.out: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata: Optional[Metadata] = None, is_coordinator: bool = False) -> None:
        self._md = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, offsets, sizes in self._requests:
            tm = tensor_meta(self._md, key)
            self.out[(key, offsets)] = torch.empty(sizes, dtype=tm.properties.dtype)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items += create_read_items_for_chunk_list(key, tm, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise ConvertError(f"unexpected object read for '{read_item.dest_index.fqn}'")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        t = self.out[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, o, n)
        return t

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


def read_chunks(ckpt: Path, requests: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> list[torch.Tensor]:
    """Read each (key, offsets, sizes) region of a Megatron checkpoint (any TP/PP it was saved at)."""
    planner = _ChunkLoadPlanner(requests)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load({}, storage_reader=dcp.FileSystemReader(str(ckpt)), planner=planner, no_dist=True)
        except READ_ERRORS as e:
            raise unreadable(ckpt, e) from None
    return [planner.out[(k, o)] for k, o, _ in requests]
