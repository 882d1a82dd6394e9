"""The embedded defaults that ``meml demo`` and ``meml compare`` run: a recipe pair (MEF + RIEL) each, and where
MEF's expert answers come from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from megatron_meml.config import PACKAGED_RECIPES as RECIPES
from megatron_meml.errors import ConfigError, RunError
from megatron_meml.stages.traces_store import FRAGMENT


@dataclass(frozen=True, kw_only=True)
class EmbeddedDefault:
    """One end-to-end default."""

    name: str
    """What users pass to ``--default``."""
    mef: str
    """Stage-1 recipe file name (in the recipe folder)."""
    riel: str
    """Stage-2 recipe file name."""
    traces: Optional[str]
    """Where MEF's expert answers come from: ``rendered`` (the task family writes the gold work in each expert's
    style, experts.styles), ``teacher`` (``meml traces`` samples them from a teacher model first; MEF gets the
    trace files) or None (the toy: synthetic styles, no pretrained model)."""
    what: str
    """One line for the help text."""
    expected_s: dict[str, float] = field(default_factory=dict)
    """Seconds per demo stage on the reference machine (2 cores, AVX2, fp32), for ``meml demo``'s time-left
    estimate: model, traces, base_eval, mef, mef_eval, riel."""


DEFAULTS = {
    "smollm2-styles": EmbeddedDefault(
        name="smollm2-styles", mef="smollm2-styles-mef.yaml", riel="smollm2-styles.yaml", traces="rendered",
        what="SmolLM2-135M-Instruct (pretrained, from PyPI), three experts each taught one style of the gold work, "
             "MEF on word-arithmetic levels 1-4, RL on the multi-step levels 5-7 (sparse rewards)",
        expected_s={"model": 1, "mef": 429, "riel": 555}),
    "toy": EmbeddedDefault(name="toy", mef="embedded-default-mef.yaml", riel="embedded-default.yaml", traces=None,
                           what="a 0.6M-parameter model trained from scratch on character-level arithmetic",
                           expected_s={"mef": 120, "riel": 100}),
    "smollm2": EmbeddedDefault(name="smollm2", mef="smollm2-wordmath-mef.yaml", riel="smollm2-wordmath.yaml",
                               traces="teacher", what="SmolLM2-135M-Instruct, experts 1 and 2 taught the base "
                               "model's own verified answers, word-arithmetic levels 2, 4, 5",
                               expected_s={"model": 1, "traces": 347, "base_eval": 144, "mef": 775,
                                           "mef_eval": 103, "riel": 525}),
    "smollm2-sparse": EmbeddedDefault(
        name="smollm2-sparse", mef="smollm2-wordmath-sparse-mef.yaml", riel="smollm2-wordmath-sparse.yaml",
        traces="teacher", what="as smollm2, MEF on levels 1-4 and RL on the multi-step levels 5-7 (sparse rewards)",
        expected_s={"model": 1, "traces": 350, "base_eval": 150, "mef": 700, "mef_eval": 110, "riel": 600}),
}
"""The first is what ``meml demo`` and ``make demo`` run."""


def resolve(name: str, recipe_dir: Optional[str]) -> tuple[EmbeddedDefault, Path, Path]:
    """(default, MEF recipe path, RIEL recipe path); ConfigError naming the valid names for an unknown one."""
    if name not in DEFAULTS:
        raise ConfigError(f"--default '{name}': unknown; choose one of {sorted(DEFAULTS)}")
    d = DEFAULTS[name]
    folder = Path(recipe_dir) if recipe_dir else RECIPES
    return d, folder / d.mef, folder / d.riel


def trace_overrides(traces_dir: Path) -> list[str]:
    """``experts.teacher_traces.<id>=<file>`` overrides from the fragment ``meml traces`` wrote in ``traces_dir``."""
    path = traces_dir / FRAGMENT
    if not path.is_file():
        raise RunError(f"{path}: no traces fragment; did `meml traces` finish?")
    files = (yaml.safe_load(path.read_text()) or {}).get("experts", {}).get("teacher_traces", {})
    return [f"experts.teacher_traces.{eid}={file}" for eid, file in files.items()]
