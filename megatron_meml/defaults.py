"""The embedded defaults that ``meml demo`` and ``meml compare`` run: a recipe pair (MEF + RIEL) each, and whether
stage 1 first needs teacher traces (``meml traces``) for its non-gold experts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@dataclass(frozen=True, kw_only=True)
class EmbeddedDefault:
    """One end-to-end default."""

    name: str
    """What users pass to ``--default``."""
    mef: str
    """Stage-1 recipe file name (in the recipe folder)."""
    riel: str
    """Stage-2 recipe file name."""
    traces: bool
    """Run ``meml traces`` on the MEF recipe first and give MEF its trace files (real models: expert1/expert2 have
    no gold solutions in their styles)."""
    what: str
    """One line for the help text."""


DEFAULTS = {
    "toy": EmbeddedDefault(name="toy", mef="embedded-default-mef.yaml", riel="embedded-default.yaml", traces=False,
                           what="a 0.6M-parameter model trained from scratch on character-level arithmetic"),
    "smollm2": EmbeddedDefault(name="smollm2", mef="smollm2-wordmath-mef.yaml", riel="smollm2-wordmath.yaml",
                               traces=True, what="SmolLM2-135M-Instruct (pretrained, from PyPI) on word arithmetic"),
    "smollm2-sparse": EmbeddedDefault(
        name="smollm2-sparse", mef="smollm2-wordmath-sparse-mef.yaml", riel="smollm2-wordmath-sparse.yaml",
        traces=True, what="the same model, MEF on levels 1-4 and RL on the multi-step levels 5-7 (sparse rewards)"),
}


def resolve(name: str, recipe_dir: Optional[str]) -> tuple[EmbeddedDefault, Path, Path]:
    """(default, MEF recipe path, RIEL recipe path); ValueError naming the valid names for an unknown one."""
    if name not in DEFAULTS:
        raise ValueError(f"--default '{name}': unknown; choose one of {sorted(DEFAULTS)}")
    d = DEFAULTS[name]
    folder = Path(recipe_dir) if recipe_dir else RECIPES
    return d, folder / d.mef, folder / d.riel


def trace_overrides(traces_dir: Path) -> list[str]:
    """``experts.teacher_traces.<id>=<file>`` overrides from the fragment ``meml traces`` wrote in ``traces_dir``."""
    from megatron_meml.traces_store import FRAGMENT

    path = traces_dir / FRAGMENT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no traces fragment; did `meml traces` finish?")
    files = (yaml.safe_load(path.read_text()) or {}).get("experts", {}).get("teacher_traces", {})
    return [f"experts.teacher_traces.{eid}={file}" for eid, file in files.items()]
