"""Recipes: YAML diffs over the component dataclass defaults, plus dotted CLI overrides.

Each component owns its config dataclass (frozen, kw_only) next to its code; this module only assembles them
into :class:`MemlConfig` and implements loading. Merging and type checking come from OmegaConf structured
configs; this module adds the error messages users need (file, key, nearest valid key, expected type).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_meml.algo.config import AlgoConfig
from megatron_meml.data.config import DataConfig
from megatron_meml.errors import ConfigError
from megatron_meml.experts.config import ExpertsConfig
from megatron_meml.hard_examples.config import HardExampleConfig
from megatron_meml.model.config import ModelConfig
from megatron_meml.parallel import ParallelConfig
from megatron_meml.reporting.config import LoggingConfig
from megatron_meml.rewards.config import RewardConfig
from megatron_meml.rollout.config import RolloutConfig
from megatron_meml.stages.config import CheckpointConfig, EvalConfig, TracesConfig
from megatron_meml.training.config import TrainConfig

PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"
"""The recipes shipped inside the package (the repository's recipes/ links here); ``meml CMD NAME`` finds NAME.yaml
there when NAME is not a file."""



@dataclass(frozen=True, kw_only=True)
class MemlConfig:
    """The whole run: one field per component."""

    run_name: str = "meml"
    """Name of the run; the run directory is ``<output_dir>/<run_name>``."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 1234
    """Global seed (model init, sampler, rollouts, hard-example admission)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture / checkpoint / layer spec."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline / data parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation problems."""
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    """The K expert system prompts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine and sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verifier bounds (how much of a response is read, time limits)."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Advantages, losses, mutual learning."""
    hard_examples: HardExampleConfig = field(default_factory=HardExampleConfig)
    """Hard-example store."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, batch sizes, steps."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    traces: TracesConfig = field(default_factory=TracesConfig)
    """Teacher traces for MEF (``meml traces``)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and location."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks and progress output."""

    def __post_init__(self) -> None:
        if self.reward.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"reward.overlong_buffer={self.reward.overlong_buffer} is longer than "
                             f"rollout.max_new_tokens={self.rollout.max_new_tokens}")
        if self.train.max_tokens_per_micro_batch > 0 and self.model.layer_spec == "local":
            raise ValueError("train.max_tokens_per_micro_batch (packed rows) needs model.layer_spec sdpa, te or auto; "
                             "Megatron's local attention has no packed-sequence path")
        if self.train.share_prompts:
            why = []
            if self.train.max_tokens_per_micro_batch <= 0:
                why.append("train.max_tokens_per_micro_batch > 0 (packed rows)")
            if self.model.layer_spec not in ("sdpa", "auto"):
                why.append(f"model.layer_spec sdpa (got {self.model.layer_spec}: only the sdpa spec's attention "
                           "lets a response see a shared prompt)")
            if not self.train.logits_at_scored_only:
                why.append("train.logits_at_scored_only true")
            if self.parallel.sequence_parallel:
                why.append("parallel.sequence_parallel false")
            if why:
                raise ValueError("train.share_prompts needs " + "; ".join(why))


# ----------------------------------------------------------------------------------------------- key checking
def _check_keys(data: Any, cls: type, where: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key in ``data`` that is not a field of dataclass ``cls`` (recursively)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys under '{prefix.rstrip('.') or '<root>'}': {', '.join(sorted(fields))}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
        sub = _dataclass_type(cls, key)
        if sub is not None and value is not None:
            _check_keys(value, sub, where, prefix=f"{prefix}{key}.")


def _dataclass_type(cls: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls`` (None if the field is not a nested dataclass)."""
    default = _default_instance(cls)
    value = getattr(default, name)
    return type(value) if dataclasses.is_dataclass(value) else None


_DEFAULTS: dict[type, Any] = {}


def _default_instance(cls: type) -> Any:
    if cls not in _DEFAULTS:
        _DEFAULTS[cls] = cls()
    return _DEFAULTS[cls]


# ----------------------------------------------------------------------------------------------- loading
def find_recipe(recipe: str | os.PathLike) -> Path:
    """A recipe file: ``recipe`` itself when it is a file, else the packaged recipe of that name (with or without
    ``.yaml``); ConfigError naming the packaged ones otherwise."""
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    packaged = PACKAGED_RECIPES / name
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in PACKAGED_RECIPES.glob("*.yaml")))
    raise ConfigError(f"recipe file not found: {recipe} (a path, or the name of a packaged recipe: {known})")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level, got {type(data).__name__}")
    return data


def _resolve_base(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """A recipe may name ``base: other.yaml`` (relative to itself); returns [(file, diff), ...] base first."""
    data = _read_yaml(path)
    base = data.pop("base", None)
    chain: list[tuple[str, dict]] = []
    if base is not None:
        bpath = (path.parent / str(base)).resolve()
        if bpath in seen:
            raise ConfigError(f"{path}: 'base' chain loops back to {bpath}")
        chain = _resolve_base(bpath, seen + (path.resolve(),))
    chain.append((str(path), data))
    return chain


def recipe_chain(recipe) -> list[tuple[Path, dict]]:
    """The files a recipe is built from, its ``base:`` chain first, then the recipe itself, each with the settings
    it makes (its parsed YAML, less ``base``)."""
    return [(Path(where), data) for where, data in _resolve_base(find_recipe(recipe))]


def recipe_files(recipe) -> list[Path]:
    """The files a recipe is built from: its ``base:`` chain, base first, then the recipe itself."""
    return [path for path, _ in recipe_chain(recipe)]


def parse_override(text: str) -> tuple[str, Any]:
    """``"algo.num_experts=3"`` -> ``("algo.num_experts", 3)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. algo.num_experts=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans; on the command line they are words
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _merge_one(merged: Any, data: dict, where: str) -> Any:
    _check_keys(data, MemlConfig, where)
    try:
        return OmegaConf.merge(merged, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        want = _expected_type(key)
        hint = f" (expected {want})" if want else ""
        raise ConfigError(f"{where}: key '{key}'{hint}: {_short(e)}") from None


def _expected_type(key: str) -> str | None:
    """The annotated type of dotted ``key`` in MemlConfig, as written in the dataclass (e.g. 'int')."""
    cls: Any = MemlConfig
    ftype = None
    for part in key.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        ftype = fields[part].type
        cls = _dataclass_type(cls, part)
    return ftype if isinstance(ftype, str) else getattr(ftype, "__name__", None)


def _short(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    return msg


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> MemlConfig:
    """Load a recipe (a YAML diff over the defaults) and apply dotted ``key=value`` overrides."""
    merged = OmegaConf.structured(MemlConfig)
    if recipe is not None:
        for where, data in _resolve_base(find_recipe(recipe)):
            merged = _merge_one(merged, data, where)
    for text in overrides:
        key, value = parse_override(text)
        merged = _merge_one(merged, _nest(key, value), f"override '{text}'")
    try:
        return OmegaConf.to_object(merged)
    except (ValueError, TypeError) as e:  # __post_init__ checks name their field
        raise ConfigError(f"{recipe or 'defaults + overrides'}: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{recipe or 'defaults + overrides'}: {_short(e)}") from None


def to_yaml(cfg: MemlConfig) -> str:
    """The resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
