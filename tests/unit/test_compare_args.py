"""`meml compare` argument handling: extra variants, --only, and bad input caught before any run starts."""
from __future__ import annotations

import pytest

from megatron_meml.config import load_config
from megatron_meml.experiments.compare import PAPER_MUTUAL, RL_VARIANTS, parse_variant, run_compare


def test_parse_variant():
    assert parse_variant("MEML-tok: algo.mutual_normalise=token  algo.lambda_kl=0.5") == (
        "MEML-tok", ["algo.mutual_normalise=token", "algo.lambda_kl=0.5"])
    for bad in ("no colon", ": algo.lambda_kl=1", "Two words: algo.lambda_kl=1", "MoE-SFT: algo.lambda_kl=1"):
        with pytest.raises(ValueError, match="expected 'NAME: key=value"):
            parse_variant(bad)
    with pytest.raises(ValueError, match="'algo.lambda_kl' is not a key=value"):
        parse_variant("X: algo.lambda_kl")


def test_paper_variant_resets_every_mutual_lever():
    cfg = load_config(None, ["algo.mutual_normalise=token", "algo.lambda_kl_warmup_steps=5",
                             "algo.mutual_min_student_logprob=-1.5", "algo.mutual_teacher_nll=0.5", *PAPER_MUTUAL])
    default = load_config(None, [])
    assert cfg.algo == default.algo
    assert RL_VARIANTS["MEML-GRPO-paper"] == PAPER_MUTUAL


def test_async_variant_is_meml_one_step_off_policy():
    cfg = load_config(None, RL_VARIANTS["MEML-GRPO-async"])
    default = load_config(None, [])
    assert cfg.rollout.max_staleness == 1 and cfg.algo == default.algo and cfg.train == default.train


@pytest.mark.parametrize("kwargs,message", [
    ({"variants": ["X: algo.no_such_key=1"]}, "no_such_key"),
    ({"only": ["MEML-GRPO", "Nope"]}, "--only: unknown variant(s) ['Nope']"),
])
def test_bad_compare_input_fails_before_running(tmp_path, capsys, kwargs, message):
    assert run_compare(None, [], [1], str(tmp_path / "cmp"), **kwargs) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_final_eval_columns(tmp_path):
    import json

    from megatron_meml.experiments.compare import REWARD_WINDOW, _final_eval

    ev = {"stage": "eval", "step": 12, "eval/synthetic/a/accuracy": 0.2, "eval/synthetic/b/accuracy": 0.3,
          "eval/synthetic/c/accuracy": 0.5, "eval/synthetic/best_expert/accuracy": 0.5}
    train = [{"stage": "train", "step": s, "expert/a/reward_mean": 0.1,
              "expert/b/reward_mean": 0.9 if s > 12 - REWARD_WINDOW else 0.0,   # b leads over the window
              "expert/c/reward_mean": 0.5 if s > 12 - REWARD_WINDOW else 5.0} for s in range(1, 13)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [*train, ev]))
    assert _final_eval(tmp_path, "a") == {"acc_expert0": 0.2, "acc_best_expert": 0.5, "acc_reward_best": 0.3,
                                          "acc_b": 0.3, "acc_c": 0.5}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ev))  # an SFT row: no training reward, no column
    assert _final_eval(tmp_path, "a") == {"acc_expert0": 0.2, "acc_best_expert": 0.5, "acc_b": 0.3, "acc_c": 0.5}


def test_traces_default_pins_the_problems_over_seeds(tmp_path, monkeypatch):
    """The smollm2 default draws teacher traces once, for one set of train problems: every command of every seed
    must then name the same data.seed (else seeds 2, 3 get wordmath problems the trace ids never join to), while
    the toy keeps varying its problems with the seed."""
    import megatron_meml.experiments.compare as compare

    calls = []
    monkeypatch.setattr(compare, "_meml", lambda argv, log, recipes: calls.append(argv))
    monkeypatch.setattr(compare, "_final_eval", lambda run_dir, e0: {"acc_expert0": 0.0, "acc_best_expert": 0.0})
    monkeypatch.setattr(compare, "trace_overrides", lambda d: ["experts.teacher_traces.expert1=t.jsonl"])
    monkeypatch.setattr(compare, "write_compare_table", lambda rows, root, **kw: None)
    assert run_compare(None, [], [1, 2], str(tmp_path / "real"), only=["MEML-GRPO"], default="smollm2") == 0
    assert [a[0] for a in calls] == ["traces", "sft", "eval", "train", "sft", "eval", "train"]
    assert all("data.seed=1234" in a for a in calls)
    assert {a for argv in calls[1:] for a in argv if a.startswith("seed=")} == {"seed=1", "seed=2"}
    calls.clear()
    assert run_compare(None, [], [1], str(tmp_path / "toy"), only=["MEML-GRPO"]) == 0
    assert calls and not any(a.startswith("data.seed=") for argv in calls for a in argv)


def test_data_seed_fixes_the_problems_not_the_run():
    from megatron_meml.experiments.defaults import RECIPES
    from megatron_meml.stages.inputs import load_data

    def ids(*over):
        cfg = load_config(RECIPES / "smollm2-wordmath.yaml", list(over))
        splits = load_data(cfg)
        train, val = splits.train, splits.test
        return [p.id for p in train[:50]], [p.id for p in val]

    assert ids("seed=1", "data.seed=7") == ids("seed=2", "data.seed=7")
    assert ids("seed=1") != ids("seed=2")
    assert ids("seed=7") == ids("seed=1", "data.seed=7")


def test_dynamic_rows_get_the_plain_rows_rollout_budget():
    """Equal generation, not equal steps: budget = steps x problems x K x G of the recipe (toy: 30 x 8 x 3 x 8)."""
    from megatron_meml.experiments.compare import DYNAMIC_ROWS, dynamic_variants
    from megatron_meml.experiments.defaults import RECIPES

    base = load_config(RECIPES / "embedded-default.yaml")
    rows = dynamic_variants(base)
    assert sorted(rows) == sorted(DYNAMIC_ROWS)
    for name, over in rows.items():
        cfg = load_config(RECIPES / "embedded-default.yaml", over)
        assert cfg.algo.dynamic_sampling and cfg.train.rollout_budget == 30 * 8 * 3 * 8, name
        assert cfg.train.steps == 30 * cfg.algo.dynamic_sampling_max_gen_batches
        per_batch = cfg.train.problems_per_step * cfg.algo.num_experts * cfg.rollout.samples_per_expert
        assert per_batch == 8 * 3 * 8, name  # DAPO-1exp: 1 expert on 3x the questions
    one = load_config(RECIPES / "embedded-default.yaml", rows["DAPO-1exp"])
    assert (one.algo.num_experts, one.algo.clip_high, one.algo.mutual_learning, one.hard_examples.enabled) == (
        1, 0.28, False, False)
    assert one.reward.overlong_buffer == 56 // 5
    meml = load_config(RECIPES / "embedded-default.yaml", rows["MEML-GRPO-DS"])
    assert meml.algo.mutual_learning and meml.hard_examples.enabled


def test_compare_table_gathers_the_seeds_of_earlier_compares(tmp_path, monkeypatch):
    """``--seeds 1`` then ``--seeds 2`` in one output directory give one table over both seeds (a re-run seed replaces
    its rows); after a recipe file's settings change, the earlier rows are left out of the table (not after an edited
    comment)."""
    import json
    import shutil

    import megatron_meml.experiments.compare as compare

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in ("embedded-default.yaml", "embedded-default-mef.yaml"):
        shutil.copy(compare.Path(__file__).resolve().parents[2] / "recipes" / name, recipes / name)
    acc = {"1": 0.25, "2": 0.5}
    monkeypatch.setattr(compare, "_meml", lambda argv, log, recipes: None)
    monkeypatch.setattr(compare, "_final_eval", lambda run_dir, e0: {
        "acc_expert0": acc[run_dir.name.split("-s")[-1].split("-")[0]], "acc_best_expert": 1.0})
    out = tmp_path / "cmp"

    def table(seed):
        assert run_compare(str(recipes), [], [seed], str(out), only=["MEML-GRPO"]) == 0
        rows = json.loads((out / "compare_rows.json").read_text())
        return [(r["variant"], r["seed"], r["acc_expert0"]) for r in rows]

    assert table(1) == [("MoE-SFT", 1, 0.25), ("MEML-GRPO", 1, 0.25)]
    assert table(2) == [("MoE-SFT", 1, 0.25), ("MEML-GRPO", 1, 0.25), ("MoE-SFT", 2, 0.5), ("MEML-GRPO", 2, 0.5)]
    acc["1"] = 0.75  # seed 1 again: its rows are replaced in place
    assert table(1) == [("MoE-SFT", 1, 0.75), ("MEML-GRPO", 1, 0.75), ("MoE-SFT", 2, 0.5), ("MEML-GRPO", 2, 0.5)]
    assert "(1, 2)" in (out / "compare.md").read_text()
    rl = recipes / "embedded-default.yaml"
    rl.write_text(rl.read_text() + "\n# a comment edited: the same settings, the rows kept\n")
    assert len(table(2)) == 4
    rl.write_text(rl.read_text().replace("save_every: 10", "save_every: 11"))
    assert table(2) == [("MoE-SFT", 2, 0.5), ("MEML-GRPO", 2, 0.5)]


def test_compare_reuses_a_run_from_another_checkout_but_not_after_a_base_recipe_changes(tmp_path, monkeypatch):
    """A finished run is reused when the same command runs on recipe files of the same contents, wherever they lie
    (a fresh clone reuses a compare's runs); an edit to a setting in a file of the ``base:`` chain, not only to the
    recipe pair, reruns it, an edited comment does not; a stamp from before the settings and the chain were recorded
    (no ``settings``, no ``bases``) is judged on the pair's bytes alone."""
    import json
    import shutil

    import megatron_meml.experiments.compare as compare

    a = tmp_path / "a"
    (a / "base").mkdir(parents=True)
    (a / "base" / "common.yaml").write_text("seed: 7\n")
    (a / "rl.yaml").write_text("base: base/common.yaml\nrun_name: rl\n")
    (a / "mef.yaml").write_text("base: rl.yaml\nrun_name: mef\n")
    calls = []
    monkeypatch.setattr(compare.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    log = tmp_path / "out" / "MoE-SFT-s1.log"
    log.parent.mkdir()

    def run(where, *extra):
        stamp = compare.recipe_stamp(where / "mef.yaml", where / "rl.yaml")
        compare._meml(["sft", str(where / "mef.yaml"), "seed=1", *extra], log, stamp)
        return len(calls)

    assert run(a) == 1
    assert run(a) == 1  # finished: reused
    assert run(a, "train.lr=1e-5") == 2  # another command
    assert run(a) == 3
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert run(b) == 3  # the same files in another checkout
    (b / "base" / "common.yaml").write_text("seed: 8\n")
    assert run(b) == 4  # the base chain changed
    (b / "base" / "common.yaml").write_text("# the common settings\nseed:   8\n")
    assert run(b) == 4  # a comment and the layout: the same settings
    done = log.with_suffix(".done.json")
    legacy = json.loads(done.read_text())
    del legacy["bases"], legacy["settings"]
    done.write_text(json.dumps(legacy))
    assert run(b) == 4
    (b / "rl.yaml").write_text("base: base/common.yaml\nrun_name: rl2\n")
    assert run(b) == 5  # the pair itself changed
