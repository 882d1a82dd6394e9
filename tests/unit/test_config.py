"""Recipe loading: YAML diffs over dataclass defaults, dotted overrides, and the errors users see."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_meml.config import ConfigError, MemlConfig, load_config, parse_override, to_yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == MemlConfig()
    assert cfg.algo.num_experts == 3 and cfg.hard_examples.k_wrong == 6


@pytest.mark.parametrize("recipe", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, MemlConfig)
    assert load_config(recipe) == cfg  # deterministic


def test_recipe_is_a_diff_and_overrides_win(tmp_path):
    p = _write(tmp_path, "algo:\n  num_experts: 2\n  lambda_kl: 0.5\ntrain:\n  lr: 3.0e-6\n")
    cfg = load_config(p, ["algo.num_experts=3", "rollout.temperature=0.7", "data.synthetic_levels=[1,2]",
                          "data.synthetic_weights=[0.5,0.5]"])
    assert cfg.algo.num_experts == 3 and cfg.algo.lambda_kl == 0.5 and cfg.train.lr == 3e-6
    assert cfg.rollout.temperature == 0.7 and cfg.data.synthetic_levels == [1, 2]
    assert cfg.algo.advantage == "paper"  # untouched default


def test_base_chain(tmp_path):
    _write(tmp_path, "algo:\n  num_experts: 1\ntrain:\n  steps: 7\n", "base.yaml")
    p = _write(tmp_path, "base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(p)
    assert cfg.algo.num_experts == 1 and cfg.train.steps == 9


def test_unknown_key_names_key_file_and_nearest(tmp_path):
    p = _write(tmp_path, "algo:\n  num_expert: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'algo.num_expert'" in msg and "did you mean 'algo.num_experts'" in msg


def test_unknown_top_level_section(tmp_path):
    p = _write(tmp_path, "trian:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(p)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"override 'rollout.temprature=1'.*did you mean 'rollout.temperature'"):
        load_config(None, ["rollout.temprature=1"])


def test_type_error_names_key_and_type(tmp_path):
    p = _write(tmp_path, "train:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.steps" in str(e.value) and "int" in str(e.value)


def test_override_type_error():
    with pytest.raises(ConfigError, match=r"algo.lambda_kl.*float"):
        load_config(None, ["algo.lambda_kl=abc"])


def test_value_check_names_field():
    with pytest.raises(ConfigError, match=r"algo.advantage must be one of"):
        load_config(None, ["algo.advantage=median"])
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel needs parallel.tp > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match=r"algo.mutual_normalise must be one of"):
        load_config(None, ["algo.mutual_normalise=pair"])
    with pytest.raises(ConfigError, match=r"algo.mutual_min_student_logprob is a mean log-prob"):
        load_config(None, ["algo.mutual_min_student_logprob=0.5"])


def test_section_must_be_mapping(tmp_path):
    p = _write(tmp_path, "algo: 3\n")
    with pytest.raises(ConfigError, match=r"'algo' must be a mapping"):
        load_config(p)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "algo: [\n"))
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    p = _write(tmp_path, "run_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=off") == ("a.b", "off") and parse_override("a.b=true") == ("a.b", True)
    assert load_config(None, ["logging.progress=off"]).logging.progress == "off"
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("a.b")


def test_frozen_and_round_trip(tmp_path):
    cfg = load_config(None, ["seed=5"])
    with pytest.raises(Exception):
        cfg.seed = 6  # type: ignore[misc]
    p = _write(tmp_path, to_yaml(cfg))
    assert load_config(p) == cfg


POLICY = ["algo.aux_normaliser=policy", "algo.pg_normaliser=all"]


@pytest.mark.parametrize("overrides,message", [
    (["algo.aux_normaliser=mean"], r"algo.aux_normaliser must be one of \('own', 'policy'\)"),
    (["algo.pg_normaliser=positive"], r"algo.pg_normaliser must be one of \('scored', 'all'\)"),
    # under paper_pg the scored count is 0 in a step where no answer is right
    (["algo.aux_normaliser=policy"], r"algo.aux_normaliser=policy with algo.policy_loss=paper_pg needs "
                                     r"algo.pg_normaliser=all"),
    # each auxiliary row must add what a policy row adds: a token sum under token_mean ...
    ([*POLICY, "algo.mutual_normalise=token"], r"algo.aggregation=token_mean needs algo.mutual_normalise=sequence"),
    ([*POLICY, "algo.sft_aggregation=seq_mean_token_mean"],
     r"algo.aggregation=token_mean needs algo.sft_aggregation=token_mean"),
    # ... a row's token mean under seq_mean_token_mean
    ([*POLICY, "algo.aggregation=seq_mean_token_mean", "algo.sft_aggregation=seq_mean_token_mean"],
     r"algo.aggregation=seq_mean_token_mean needs algo.mutual_normalise=token"),
    ([*POLICY, "algo.aggregation=seq_mean_token_mean", "algo.mutual_normalise=token"],
     r"algo.aggregation=seq_mean_token_mean needs algo.sft_aggregation=seq_mean_token_mean"),
    ([*POLICY, "algo.aggregation=seq_mean_token_sum", "algo.sft_aggregation=token_mean"],
     r"algo.aggregation=seq_mean_token_sum needs algo.sft_aggregation=seq_mean_token_sum"),
])
def test_normaliser_checks_name_the_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    POLICY,
    [*POLICY, "algo.aggregation=seq_mean_token_mean", "algo.mutual_normalise=token",
     "algo.sft_aggregation=seq_mean_token_mean"],
    [*POLICY, "algo.aggregation=seq_mean_token_sum", "algo.sft_aggregation=seq_mean_token_sum"],
    # the clipped loss trains every row: its normaliser counts them all under either pg_normaliser
    ["algo.aux_normaliser=policy", "algo.policy_loss=clipped"],
    # without mutual learning its normalisation is not read
    [*POLICY, "algo.mutual_learning=false", "algo.mutual_normalise=token"],
    ["algo.pg_normaliser=all"],
])
def test_normaliser_combinations_that_compose(overrides):
    load_config(None, overrides)
