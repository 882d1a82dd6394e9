"""Hugging Face side of the conversion: lazy safetensors reading, sharded safetensors writing, and the
non-weight files (config.json, tokenizer) that travel with a checkpoint."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoints_convert.mapping import ConvertError

INDEX = "model.safetensors.index.json"
# Files copied beside a converted checkpoint so that it stays usable with its tokenizer and generation defaults.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@contextmanager
def open_safetensors(f: Path) -> Iterator:
    """``safe_open`` whose failures (truncated, corrupt or missing file) become one ConvertError naming the file."""
    try:
        with safe_open(str(f), framework="pt") as h:
            yield h
    except (SafetensorError, OSError) as e:
        raise ConvertError(f"'{f}' cannot be read as safetensors ({e}): it is missing, truncated or corrupt; "
                           "write it again (re-run the fetch or conversion that made it)") from None


class HFReader:
    """Tensor name -> file index of a HF model directory; each read opens the file lazily (mmap, one tensor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = {name: path / f for name, f in weight_map.items()}
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise ConvertError(f"no *.safetensors weights in '{path}' (.bin checkpoints are not supported: "
                                   "re-save them with save_pretrained(safe_serialization=True))")
            self.files = {}
            for f in shards:
                with open_safetensors(f) as h:
                    self.files.update({k: f for k in h.keys()})

    def _file(self, name: str) -> Path:
        try:
            return self.files[name]
        except KeyError:
            raise ConvertError(f"tensor '{name}' is missing from the HF checkpoint in '{self.path}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        with open_safetensors(self._file(name)) as h:
            return tuple(h.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with open_safetensors(self._file(name)) as h:
            code = h.get_slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise ConvertError(f"tensor '{name}' has dtype {code}; supported: {', '.join(SAFETENSORS_DTYPES)}")
        return SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        with open_safetensors(self._file(name)) as h:
            return h.get_tensor(name).clone()  # own the memory, so the mapping can be dropped with the handle


class ShardWriter:
    """Writes HF tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_bytes`` + index."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += n
        self.total += n

    def _flush(self) -> None:
        save_file(self.pending, str(self.out / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.out / "shard-00000.tmp").rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"shard-{i:05d}.tmp").rename(self.out / fname)
            weight_map.update({k: fname for k in names})
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map},
                                                 indent=2))


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; a non-empty one is refused unless ``overwrite`` (then its contents are removed)."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output path '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConvertError(f"output directory '{out}' is not empty; pass --overwrite to replace its contents")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def copy_side_files(src: Path, out: Path, config: dict, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Write config.json (its dtype set to ``dtype``) and copy the tokenizer/generation files present in ``src``."""
    config = dict(config)
    if dtype is not None:  # transformers >= 5 writes "dtype", older versions "torch_dtype"
        config["dtype" if "dtype" in config else "torch_dtype"] = DTYPE_NAMES[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied
