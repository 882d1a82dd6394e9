"""The two conversions, streamed: HF safetensors -> Megatron dist checkpoint, and back."""
from __future__ import annotations

import json
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Optional

import torch

from checkpoints_convert.dist_ckpt import Chunk, read_chunks, read_metadata, tensor_meta, write_checkpoint
from checkpoints_convert.hf_io import DTYPE_NAMES, HFReader, ShardWriter, copy_side_files, prepare_out_dir
from checkpoints_convert.mapping import EXTRA_STATE_MODULES, LAYER_PREFIX, ConvertError, ckpt_key, tp_regions
from checkpoints_convert.mappings import (expected_hf_shapes, expected_shape, hf_to_megatron, megatron_names,
                                          megatron_to_hf)
from megatron_meml.model.arch import ArchSpec, arch_from_hf_config, load_hf_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
META_FILE = "convert_meta.json"


def load_arch(path: Path) -> tuple[dict, ArchSpec]:
    """(config.json contents, ArchSpec) of a model directory; user errors become ConvertError."""
    try:
        cfg = load_hf_config(path)
        return cfg, arch_from_hf_config(cfg, str(path / "config.json"))
    except (OSError, ValueError, KeyError) as e:
        msg = f"{path / 'config.json'}: missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ConvertError(msg) from None


def check_layout(arch: ArchSpec, tp: int, pp: int) -> None:
    try:
        arch.check_tp(tp)
        arch.check_pp(pp)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _global_shape(arch: ArchSpec, name: str) -> tuple[int, ...]:
    _, layer = ckpt_key(name)
    full = expected_shape(arch, name)
    return full if layer is None else (arch.num_layers, *full)


class _OneTensorCache:
    """Builds each full Megatron tensor once, for all of its TP pieces; holds only the latest one."""

    def __init__(self, arch: ArchSpec, reader: HFReader) -> None:
        self.arch, self.reader = arch, reader
        self.name: Optional[str] = None
        self.tensor: Optional[torch.Tensor] = None

    def piece(self, name: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        if name != self.name:
            self.name, self.tensor = None, None  # drop the previous tensor before building the next
            self.tensor, self.name = hf_to_megatron(self.arch, name, self.reader.get), name
        return self.tensor[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]


def _validate_hf(arch: ArchSpec, reader: HFReader, names: list[str]) -> None:
    for name in names:
        for hf_name, want in expected_hf_shapes(arch, name).items():
            got = reader.shape(hf_name)
            if got != want:
                raise ConvertError(f"tensor '{hf_name}' has shape {got}, expected {want} from config.json")


def _chunks(arch: ArchSpec, names: list[str], tp: int, dtype: torch.dtype, cache: _OneTensorCache) -> list[Chunk]:
    chunks = []
    for name in names:
        key, layer = ckpt_key(name)
        for offsets, sizes in tp_regions(name, expected_shape(arch, name), tp):
            produce = partial(cache.piece, name, offsets, sizes)
            if layer is not None:  # stacked on the layer axis: a [1, ...] piece at the layer's index
                offsets, sizes = (layer, *offsets), (1, *sizes)
                produce = partial(lambda f: f().unsqueeze(0), produce)
            chunks.append(Chunk(key=key, global_shape=_global_shape(arch, name), offsets=offsets, sizes=sizes,
                                dtype=dtype, produce=produce))
    return chunks


def hf_to_megatron_dir(hf: Path, out: Path, *, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                       overwrite: bool = False) -> dict:
    """Convert a HF model directory into a Megatron dist checkpoint (+ config, tokenizer, convert_meta.json).

    The checkpoint stores each parameter in the pieces a TP=``tp`` run would save; it loads at any TP/PP.
    ``dtype`` None keeps the stored dtype of the embedding. Returns the meta dict.
    """
    cfg, arch = load_arch(hf)
    check_layout(arch, tp, pp)
    reader = HFReader(hf)
    names = list(megatron_names(arch))
    _validate_hf(arch, reader, names)
    store = DTYPES[dtype] if dtype else reader.dtype("model.embed_tokens.weight")
    prepare_out_dir(out, overwrite)
    objects = {f"{LAYER_PREFIX}{m}._extra_state/shard_{i}_{arch.num_layers}": None
               for i in range(arch.num_layers) for m in EXTRA_STATE_MODULES}
    write_checkpoint(out, _chunks(arch, names, tp, store, _OneTensorCache(arch, reader)), objects)
    copy_side_files(hf, out, cfg, store)
    meta = {"format": "megatron-meml dist checkpoint", "version": 1, "family": arch.family,
            "dtype": DTYPE_NAMES[store], "source": str(hf.resolve()), "saved_tp": tp, "intended_pp": pp,
            "num_layers": arch.num_layers}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def megatron_to_hf_dir(megatron: Path, out: Path, *, config: Optional[Path] = None, overwrite: bool = False,
                       max_shard_bytes: int = 2 << 30) -> dict:
    """Convert a Megatron dist checkpoint (saved at any TP/PP) into HF safetensors shards + config + tokenizer.

    ``config``: directory holding the HF config.json (default: the checkpoint directory itself).
    """
    md = read_metadata(megatron)  # first: a missing checkpoint is named as such, not as a missing config.json
    cfg_dir = config or megatron
    cfg, arch = load_arch(cfg_dir)
    names = list(megatron_names(arch))
    for name in names:
        key, _ = ckpt_key(name)
        got, want = tuple(tensor_meta(md, key).size), _global_shape(arch, name)
        if got != want:
            raise ConvertError(f"Megatron tensor '{key}' has shape {got}, expected {want} from config.json")
    dtype = tensor_meta(md, ckpt_key(names[0])[0]).properties.dtype
    prepare_out_dir(out, overwrite)
    writer = ShardWriter(out, max_shard_bytes)
    for layer, group in groupby(names, key=lambda n: ckpt_key(n)[1]):
        group = list(group)
        requests = []
        for name in group:
            key, _ = ckpt_key(name)
            shape = expected_shape(arch, name)
            requests.append((key, (0,) * len(shape), shape) if layer is None else
                            (key, (layer,) + (0,) * len(shape), (1, *shape)))
        for name, t in zip(group, read_chunks(megatron, requests)):
            for hf_name, x in megatron_to_hf(arch, name, t if layer is None else t[0]):
                writer.add(hf_name, x)
    writer.close()
    copy_side_files(cfg_dir, out, cfg, dtype)
    return {"family": arch.family, "dtype": DTYPE_NAMES[dtype], "tensors": writer.total}
