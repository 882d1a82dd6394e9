"""Recipe names say what the recipe runs (<algo>-<model>-<N>n<G>g-tp<T>pp<P>[vpp<V>]dp<D>[-variant].yaml); the
content must agree with the name, and every run recipe must pass `meml plan` at the size its name gives."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_meml.config import load_config
from megatron_meml.experiments.defaults import DEFAULTS
from megatron_meml.experiments.plan import Layout, plan

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
NAME = re.compile(r"^(?P<algo>[a-z0-9]+)-(?P<model>[a-z0-9.-]+?)-(?P<nodes>\d+)n(?P<gpus>\d+)g-"
                  r"tp(?P<tp>\d+)pp(?P<pp>\d+)(?:vpp(?P<vpp>\d+))?dp(?P<dp>\d+)(?:-(?P<variant>[a-z0-9-]+))?\.yaml$")
NOT_RUNS = {f for d in DEFAULTS.values() for f in (d.mef, d.riel)}  # the CPU defaults have no cluster layout
RUNS = sorted(p for p in RECIPES.glob("*.yaml") if p.name not in NOT_RUNS)
PAPER_MODELS = {"qwen2.5-math-1.5b", "llama-3.2-1b-instruct"}
SCALE_MODELS = {"qwen2.5-7b", "qwen2.5-32b", "llama-3.1-8b", "llama-3.1-70b"}


def _parse(path: Path) -> dict:
    m = NAME.match(path.name)
    assert m, f"{path.name}: recipe names follow <algo>-<model>-<N>n<G>g-tp<T>pp<P>[vpp<V>]dp<D>[-variant].yaml"
    return m.groupdict()


@pytest.mark.parametrize("recipe", RUNS, ids=lambda p: p.name)
def test_name_matches_content_and_plan_passes(recipe):
    n = _parse(recipe)
    cfg = load_config(recipe)
    nodes, gpus = int(n["nodes"]), int(n["gpus"])
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp) == (int(n["tp"]), int(n["pp"]),
                                                                    int(n["vpp"]) if n["vpp"] else None)
    assert cfg.parallel.tp * cfg.parallel.pp * int(n["dp"]) == nodes * gpus, "TP x PP x DP must be N x G"
    assert Path(cfg.model.hf_path).name.lower() == n["model"], "the model in the name is model.hf_path's directory"
    assert (cfg.model.fp8 is not None) == ("fp8" in (n["variant"] or "").split("-"))
    p = plan(cfg, Layout(nodes=nodes, gpus_per_node=gpus))
    assert p.ok, f"{recipe.name}: meml plan fails at its own size: {p.errors}"
    assert p.dp == int(n["dp"])


def test_the_paper_runs_are_all_there():
    runs = {(_parse(p)["model"], _parse(p)["variant"]): load_config(p) for p in RUNS if _parse(p)["model"] in
            PAPER_MODELS}
    assert set(runs) == {(m, d) for m in PAPER_MODELS for d in ("gsm8k", "mathqa", "strategyqa")}
    for (model, dataset), cfg in runs.items():
        assert cfg.data.source == dataset
        assert (cfg.algo.num_experts, cfg.rollout.samples_per_expert) == (3, 8)
        assert (cfg.train.lr, cfg.train.sft_lr) == (1e-6, 1e-5)
        assert cfg.experts.ids == ["expert0", "expert1", "expert2"]


def test_scale_runs_have_bf16_and_fp8_variants():
    have = {(_parse(p)["model"], _parse(p)["variant"]) for p in RUNS if _parse(p)["model"] in SCALE_MODELS}
    assert have == {(m, v) for m in SCALE_MODELS for v in (None, "fp8")}
    for p in RUNS:
        if _parse(p)["model"] in SCALE_MODELS:
            cfg = load_config(p)
            assert cfg.model.dtype == "bf16" and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1)


def test_base_recipes_are_not_runs():
    assert all(not NAME.match(p.name) for p in (RECIPES / "base").glob("*.yaml"))
