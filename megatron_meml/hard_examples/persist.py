"""The on-disk form of a hard-example store: JSONL shards plus a checksummed manifest.

Layout of a store directory::

    MANIFEST.json                      {"body": {...}, "sha256": <sha256 of the canonical body>}
    gen-00000007.rank-00000.jsonl      one HardExample row per line (rank 0's share of generation 7)
    gen-00000007.rank-00001.jsonl      (rank 1's share)

A commit of generation g: every rank writes its shard of g (temp file, fsync, rename, fsync dir), rank 0 gathers
the shard checksums and writes the manifest the same way; the manifest rename is the commit point. Until then the
previous manifest names only files of generation g-1, which nothing touches, so a crash at any moment leaves the
last complete manifest and its files intact; leftovers (``*.tmp``, shards no manifest names) are removed on open.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_meml.atomic_file import atomic_write
from megatron_meml.atomic_file import fsync_dir as _fsync_dir
from megatron_meml.hard_examples.example import HardExample

MANIFEST = "MANIFEST.json"
FORMAT = "megatron-meml-hard-store"
VERSION = 1
_SHARD_RE = re.compile(r"^gen-(\d{8})\.rank-(\d{5})\.jsonl(\.tmp)?$")


class StoreCorruptError(RuntimeError):
    """A store file fails its checksum or cannot be parsed; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """What the manifest records about one shard file."""

    file: str
    """File name inside the store directory."""
    sha256: str
    """Hex sha256 of the file's bytes."""
    entries: int
    """Rows in the file."""
    bytes: int
    """File size."""


def shard_name(generation: int, rank: int) -> str:
    return f"gen-{generation:08d}.rank-{rank:05d}.jsonl"


def encode_rows(examples: list[HardExample]) -> bytes:
    """JSONL bytes, one canonical (sorted-key, compact) row per example."""
    lines = [json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True, separators=(",", ":")) for e in examples]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def write_shard(directory: Path, generation: int, rank: int, examples: list[HardExample]) -> ShardInfo:
    data = encode_rows(examples)
    name = shard_name(generation, rank)
    atomic_write(directory / name, data)
    return ShardInfo(file=name, sha256=hashlib.sha256(data).hexdigest(), entries=len(examples), bytes=len(data))


def _body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: Path, body: dict[str, Any]) -> None:
    text = json.dumps({"body": body, "sha256": _body_digest(body)}, indent=1, sort_keys=True)
    atomic_write(directory / MANIFEST, text.encode())


def read_manifest(directory: Path) -> Optional[dict[str, Any]]:
    """The verified manifest body, or None when the directory holds no committed store."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
        body, digest = doc["body"], doc["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreCorruptError(f"{path}: unreadable hard-example store manifest ({exc}); restore the directory "
                                f"from a checkpoint or delete it to start an empty store") from exc
    if _body_digest(body) != digest:
        raise StoreCorruptError(f"{path}: manifest checksum mismatch (the file was modified or damaged); restore "
                                f"the directory from a checkpoint or delete it to start an empty store")
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        raise StoreCorruptError(f"{path}: not a version-{VERSION} {FORMAT} manifest "
                                f"(format={body.get('format')!r}, version={body.get('version')!r})")
    return body


def read_shards(directory: Path, body: dict[str, Any]) -> list[HardExample]:
    """Every row of every shard the manifest names, each file checked against its sha256 first."""
    out: list[HardExample] = []
    for shard in body["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise StoreCorruptError(f"{path}: listed in {directory / MANIFEST} but missing; restore the directory "
                                    f"from a checkpoint")
        data = path.read_bytes()
        if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise StoreCorruptError(f"{path}: checksum mismatch against {MANIFEST} (the shard is corrupt or was "
                                    f"modified); restore the directory from a checkpoint")
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            raise StoreCorruptError(f"{path}: not UTF-8 ({exc})") from exc
        rows = text.split("\n")[:-1]  # not splitlines(): rows may hold U+2028 and other line breaks in text
        if len(rows) != shard["entries"]:
            raise StoreCorruptError(f"{path}: {len(rows)} rows, manifest says {shard['entries']}")
        for i, line in enumerate(rows, 1):
            try:
                out.append(HardExample.from_json(json.loads(line), f"{path}:{i}"))
            except ValueError as exc:
                raise StoreCorruptError(str(exc) if str(path) in str(exc) else f"{path}:{i}: {exc}") from exc
    return out


def remove_orphans(directory: Path, body: Optional[dict[str, Any]], below_generation: Optional[int] = None
                   ) -> list[str]:
    """Delete store files the manifest does not name (temp files, shards of unfinished or superseded commits).

    ``below_generation``: only files of older generations (safe while other ranks write the next one).
    Files that do not look like store files are left alone. Returns the removed names.
    """
    keep = {s["file"] for s in body["shards"]} if body else set()
    removed = []
    for path in directory.iterdir():
        m = _SHARD_RE.match(path.name)
        stale_manifest = path.name == MANIFEST + ".tmp" and below_generation is None
        if not (stale_manifest or (m and path.name not in keep)):
            continue
        if m and below_generation is not None and int(m.group(1)) >= below_generation:
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        _fsync_dir(directory)
    return sorted(removed)
