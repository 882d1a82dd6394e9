"""`meml compare` from per-problem data: the read-outs (best-on-dev picks on the dev problems, reports on the test
problems), the paired intervals in compare.md (the same numbers as stats.paired_bootstrap on the same data), the
per-problem JSON (round trip, recomputation without the run directories) and rows without per-problem files."""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

import megatron_meml.experiments.compare as compare
from megatron_meml.reporting.compare_tables import (PICK_DEV, PICK_REWARD, compare_intervals, read_compare_problems,
                                                    recompute_intervals, run_problems, write_compare_problems,
                                                    write_compare_table)
from megatron_meml.reporting.samples import EvalProblem, eval_file, write_eval_problems
from megatron_meml.reporting.stats import paired_bootstrap, wilson

IDS = ["synth_direct", "synth_steps", "synth_columns"]
"""The toy recipe's experts.ids (the default of run_compare)."""
BENCH = "synthetic"


def _eval_rows(split: str, rewards: dict[str, list[int]], step: int = 0) -> list[EvalProblem]:
    n = len(next(iter(rewards.values())))
    return [EvalProblem(step=step, bench=BENCH, index=i, problem_id=f"{split}-{i}", gold="1",
                        rewards={e: float(r[i]) for e, r in rewards.items()}, extracted={e: None for e in rewards},
                        in_format={e: True for e in rewards}) for i in range(n)]


def _fake_run(run_dir: Path, step: int, test: dict, dev: dict | None, train_reward: dict | None) -> None:
    """What `meml train` / `meml eval` leave behind, as far as compare reads it: per-problem eval files and the
    metrics (eval accuracies on both splits, per-expert training reward)."""
    write_eval_problems(eval_file(run_dir, step), _eval_rows("test", test, step))
    ev = {"stage": "eval", "step": step, **{f"eval/{BENCH}/{e}/accuracy": statistics.fmean(r) for e, r in test.items()}}
    ev[f"eval/{BENCH}/best_expert/accuracy"] = max(statistics.fmean(r) for r in test.values())
    if dev:
        write_eval_problems(eval_file(run_dir, step, "dev"), _eval_rows("dev", dev, step))
        ev |= {f"eval/dev/{e}/accuracy": statistics.fmean(r) for e, r in dev.items()}
    train = [{"stage": "train", "step": s, **{f"expert/{e}/reward_mean": v for e, v in train_reward.items()}}
             for s in range(1, step + 1)] if train_reward else []
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*train, ev]))


def _vector(rng: random.Random, n: int, p: float) -> list[int]:
    return [int(rng.random() < p) for _ in range(n)]


def _data(name: str, n_test: int = 20, n_dev: int = 8) -> tuple[dict, dict]:
    """(test, dev) 0/1 rewards per expert of a run, drawn from a generator seeded by the run's name."""
    rng = random.Random(name)
    p = {"MoE-SFT": 0.2, "MoE-SFT-GRPO": 0.4, "MEML-GRPO": 0.55, "MEML-no-IML": 0.5}[name.split("-s")[0]]
    test = {e: _vector(rng, n_test, p + 0.1 * i) for i, e in enumerate(IDS)}
    dev = {e: _vector(rng, n_dev, p + 0.1 * i) for i, e in enumerate(IDS)}
    return test, dev


@pytest.fixture
def fake_meml(monkeypatch):
    """``_meml`` that writes each evaluated run's files instead of running it; ``dev``: whether runs have dev
    problems; ``skip``: run names that leave no per-problem files (runs evaluated before they were written);
    ``calls``: (command, run name) of every call; ``dtypes``: the model.dtype each call was given (the last
    override wins)."""
    opts = {"dev": True, "skip": set(), "calls": [], "dtypes": []}

    def fake(argv, log, recipes):
        name = next(a.split("=", 1)[1] for a in argv if a.startswith("run_name="))
        out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
        opts["calls"].append((argv[0], name))
        opts["dtypes"].append([a.split("=", 1)[1] for a in argv if a.startswith("model.dtype=")][-1])  # last wins
        if argv[0] not in ("train", "eval"):
            return
        run = out / name
        run.mkdir(parents=True, exist_ok=True)
        test, dev = _data(name.removesuffix("-eval"))
        reward = {e: 0.1 * i for i, e in enumerate(IDS)} if argv[0] == "train" else None
        _fake_run(run, 12 if argv[0] == "train" else 0, test, dev if opts["dev"] else None, reward)
        if name in opts["skip"]:
            for f in (run / "eval").iterdir():
                f.unlink()

    monkeypatch.setattr(compare, "_meml", fake)
    return opts


def _table(md: str, heading: str) -> dict[str, list[str]]:
    """Row name -> cells of the markdown table under ``heading``."""
    block = md[md.index(heading):].split("\n\n")[1]
    rows = [line.strip("| ").split(" | ") for line in block.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


def _signed(iv) -> str:
    return iv.signed() + (" *" if iv.excludes_zero else "")


def _best_on_dev(dev: dict) -> str:
    means = [statistics.fmean(dev[e]) for e in IDS]
    return IDS[means.index(max(means))]


# ------------------------------------------------------------------------------------------------ read-outs
def test_best_on_dev_picks_by_dev_and_reports_test():
    # expert2 is best on dev and worst on test; expert0 best on test
    test = _eval_rows("test", {"a": [1, 1, 1, 0], "b": [1, 1, 0, 0], "c": [1, 0, 0, 0]})
    dev = _eval_rows("dev", {"a": [0, 0, 1], "b": [1, 0, 0], "c": [1, 1, 0]})
    run = run_problems("MEML-GRPO", 1, test, dev, ["a", "b", "c"], reward_pick="a")
    assert run.readouts == {"expert0": "a", "expert1": "b", "best-on-dev": "c"} and run.pick == PICK_DEV
    assert run.correct["best-on-dev"] == {"test": [1, 0, 0, 0], "dev": [1, 1, 0]}
    assert run.correct["expert1"]["test"] == [1, 1, 0, 0]
    tie = _eval_rows("dev", {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 0]})  # a tie goes to the first expert
    assert run_problems("x", 1, test, tie, ["a", "b", "c"]).readouts["best-on-dev"] == "a"
    fallback = run_problems("MEML-GRPO", 1, test, [], ["a", "b", "c"], reward_pick="b")
    assert fallback.readouts["best-on-dev"] == "b" and fallback.pick == PICK_REWARD
    assert "dev" not in fallback.problem_ids and fallback.correct["best-on-dev"] == {"test": [1, 1, 0, 0]}
    sft = run_problems("MoE-SFT", 1, test, [], ["a", "b", "c"])
    assert "best-on-dev" not in sft.readouts and sft.pick is None
    one = run_problems("DAPO-1exp", 1, _eval_rows("test", {"a": [1, 0]}), [], ["a", "b", "c"], reward_pick="a")
    assert one.readouts == {"expert0": "a", "best-on-dev": "a"}  # no expert1 in a one-expert row


def test_hand_computed_paired_difference_on_ten_problems(tmp_path):
    """Row right on problems 0-5, baseline on 3-6: differences +1 (0, 1, 2), -1 (6), 0 elsewhere: mean +0.2. The
    exact bootstrap distribution of the mean of 10 draws from {+1: .3, -1: .1, 0: .6} puts its 2.5% quantile at -0.2
    (P(<= -0.3) = .009, P(<= -0.2) = .032) and its 97.5% quantile at 0.6 (P(<= 0.5) = .970, P(<= 0.6) = .993);
    2000 resamples land on -0.2 and within one step of 0.6. Accuracies 6/10 and 4/10: Wilson [0.313, 0.832]."""
    row = {"a": [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]}
    base = {"a": [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]}
    runs = [run_problems("MEML-GRPO", 1, _eval_rows("test", row), [], ["a"]),
            run_problems("MoE-SFT-GRPO", 1, _eval_rows("test", base), [], ["a"])]
    iv = compare_intervals(runs)
    diff = iv.per_seed["MEML-GRPO", "expert0", 1]
    assert diff.value == pytest.approx(0.2) and diff.low == pytest.approx(-0.2) and 0.5 <= diff.high <= 0.6
    assert iv.pooled["MEML-GRPO", "expert0"] == diff  # one seed: the pooled interval is the seed's
    acc = iv.accuracy["MEML-GRPO", "expert0"]
    assert acc.value == 0.6
    assert (acc.low, acc.high) == (pytest.approx(0.3127, abs=1e-4), pytest.approx(0.8318, abs=1e-4))
    md = write_compare_table([{"variant": "MEML-GRPO", "seed": 1, "acc_expert0": 0.6},
                              {"variant": "MoE-SFT-GRPO", "seed": 1, "acc_expert0": 0.4}], tmp_path, runs=runs)[0]
    text = md.read_text()
    assert _table(text, "## Paired difference to MoE-SFT-GRPO: expert0")["MEML-GRPO"] == [diff.signed()] * 2
    assert _table(text, "## Test accuracy")["MoE-SFT-GRPO"][:2] == ["1", "0.400 [0.168, 0.687]"]


# ------------------------------------------------------------------------------------------------ the compare
def test_compare_md_intervals_are_paired_bootstrap_on_the_same_data(tmp_path, fake_meml):
    out = tmp_path / "cmp"
    assert compare.run_compare(None, [], [1, 2], str(out), only=["MoE-SFT-GRPO", "MEML-GRPO"]) == 0
    md = (out / "compare.md").read_text()
    data = {f"{v}-s{s}": _data(f"{v}-s{s}") for v in ("MoE-SFT", "MoE-SFT-GRPO", "MEML-GRPO") for s in (1, 2)}
    pick = {name: _best_on_dev(dev) for name, (_, dev) in data.items()}
    expert = {"expert0": lambda name: IDS[0], "expert1": lambda name: IDS[1], "best-on-dev": pick.get}
    for ro, which in expert.items():
        pairs = [(data[f"MEML-GRPO-s{s}"][0][which(f"MEML-GRPO-s{s}")],
                  data[f"MoE-SFT-GRPO-s{s}"][0][which(f"MoE-SFT-GRPO-s{s}")]) for s in (1, 2)]
        cells = _table(md, f"## Paired difference to MoE-SFT-GRPO: {ro}")
        want = [_signed(paired_bootstrap([p])) for p in pairs] + [_signed(paired_bootstrap(pairs))]
        assert cells["MEML-GRPO"] == want, ro
        assert set(cells) == {"MoE-SFT", "MEML-GRPO"}
    acc = _table(md, "## Test accuracy")
    grpo = [data[f"MoE-SFT-GRPO-s{s}"][0][IDS[0]] for s in (1, 2)]
    assert acc["MoE-SFT-GRPO"][1] == str(paired_bootstrap([(a, [0] * len(a)) for a in grpo]))
    assert acc["MEML-GRPO"][-1] == f"{pick['MEML-GRPO-s1']}, {pick['MEML-GRPO-s2']}"
    assert "Mean over seeds with a 95% interval" in md and "percentile bootstrap interval (2000 resamples)" in md
    assert "†" not in md  # every run had dev problems
    assert (out / "compare.png").stat().st_size > 0
    rows = json.loads((out / "compare_rows.json").read_text())
    meml1 = next(r for r in rows if (r["variant"], r["seed"]) == ("MEML-GRPO", 1))
    assert meml1["acc_best_on_dev"] == statistics.fmean(data["MEML-GRPO-s1"][0][pick["MEML-GRPO-s1"]])


def test_compare_problems_json_round_trips_and_recomputes_the_intervals(tmp_path, fake_meml):
    out = tmp_path / "cmp"
    assert compare.run_compare(None, [], [1, 2], str(out), only=["MoE-SFT-GRPO", "MEML-GRPO"]) == 0
    path = out / compare.PROBLEMS_FILE
    runs, settings = read_compare_problems(path)
    assert {k: settings[k] for k in ("baseline", "resamples", "bootstrap_seed", "overrides")} == {
        "baseline": "MoE-SFT-GRPO", "resamples": 2000, "bootstrap_seed": 0, "overrides": []}
    assert settings["rows"] == json.loads((out / "compare_rows.json").read_text())
    assert [(r.variant, r.seed) for r in runs] == [(v, s) for s in (1, 2)
                                                   for v in ("MoE-SFT", "MoE-SFT-GRPO", "MEML-GRPO")]
    meml2 = runs[-1]
    test, dev = _data("MEML-GRPO-s2")
    assert meml2.correct["expert1"] == {"test": test[IDS[1]], "dev": dev[IDS[1]]}
    assert meml2.problem_ids["dev"] == [f"dev-{i}" for i in range(8)]
    copy = write_compare_problems(tmp_path / "copy.json", runs)
    assert read_compare_problems(copy)[0] == runs
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "p.json"
    moved.write_bytes(path.read_bytes())
    for d in out.iterdir():  # the run directories are not needed
        if d.is_dir():
            for f in sorted(d.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
    again = recompute_intervals(moved)
    assert again == compare_intervals(runs)
    md = (out / "compare.md").read_text()
    assert _table(md, "## Paired difference to MoE-SFT-GRPO: expert1")["MEML-GRPO"][-1] == _signed(
        again.pooled["MEML-GRPO", "expert1"])


def test_rows_without_eval_files_are_marked_and_earlier_seeds_gathered(tmp_path, fake_meml):
    out = tmp_path / "cmp"
    fake_meml["skip"] = {"MEML-GRPO-s2"}
    assert compare.run_compare(None, [], [1], str(out), only=["MoE-SFT-GRPO", "MEML-GRPO"]) == 0
    assert compare.run_compare(None, [], [2], str(out), only=["MoE-SFT-GRPO", "MEML-GRPO"]) == 0
    md = (out / "compare.md").read_text()
    assert "Runs without per-problem eval files" in md and "MEML-GRPO seed 2" in md
    cells = _table(md, "## Paired difference to MoE-SFT-GRPO: expert0")["MEML-GRPO"]
    assert cells[0] != "-" and cells[1] == "-"  # seed 1 from the first compare, seed 2 has no files
    metrics = md[md.index("## Logged metrics of every run"):]  # every run's logged metrics are still tabulated
    assert "| MEML-GRPO | 2 |" in metrics
    runs, _ = read_compare_problems(out / compare.PROBLEMS_FILE)
    assert [(r.variant, r.seed) for r in runs] == [("MoE-SFT", 1), ("MoE-SFT-GRPO", 1), ("MEML-GRPO", 1),
                                                   ("MoE-SFT", 2), ("MoE-SFT-GRPO", 2)]
    # a run directory removed after its compare: its per-problem data comes from the earlier file
    for f in (out / "MEML-GRPO-s1" / "eval").iterdir():
        f.unlink()
    assert compare.run_compare(None, [], [2], str(out), only=["MoE-SFT-GRPO", "MEML-GRPO"]) == 0
    assert ("MEML-GRPO", 1) in {(r.variant, r.seed) for r in read_compare_problems(out / compare.PROBLEMS_FILE)[0]}


def test_without_dev_problems_best_on_dev_falls_back_to_the_training_reward(tmp_path, fake_meml):
    fake_meml["dev"] = False
    out = tmp_path / "cmp"
    assert compare.run_compare(None, [], [1], str(out), only=["MoE-SFT-GRPO", "MEML-GRPO"]) == 0
    md = (out / "compare.md").read_text()
    acc = _table(md, "## Test accuracy")
    assert acc["MEML-GRPO"][-1] == f"{IDS[2]}†" and acc["MoE-SFT"][-1] == "-"  # reward 0.2 for the third expert
    assert "† no dev problems in that run" in md
    test, _ = _data("MEML-GRPO-s1")
    assert acc["MEML-GRPO"][3] == str(wilson(sum(test[IDS[2]]), len(test[IDS[2]])))


def test_resume_continues_a_compare_from_its_record_alone(tmp_path, fake_meml):
    """On another machine (no run directories) ``--resume`` with the record a compare wrote gives one table over the
    record's seeds and the new ones, running only the missing (row, seed) pairs: a new row of a recorded seed runs
    that seed's MoE-SFT start again but not its evaluation. A record of other overrides, or without rows, is refused
    with the file named."""
    first = tmp_path / "first"
    assert compare.run_compare(None, ["train.steps=3"], [1], str(first), only=["MoE-SFT-GRPO", "MEML-GRPO"]) == 0
    record = tmp_path / "kept.json"
    record.write_bytes((first / compare.PROBLEMS_FILE).read_bytes())
    kept_runs, kept = read_compare_problems(record)
    fake_meml["calls"].clear()
    out = tmp_path / "second"
    out.mkdir()
    compare._resume(out, record, compare.recipe_stamp(*compare.resolve("toy", None)[1:]), ["train.steps=3"])
    assert read_compare_problems(out / compare.PROBLEMS_FILE)[1]["rows"] == kept["rows"]  # resumable before any run
    assert compare.run_compare(None, ["train.steps=3"], [1, 2], str(out), only=["MoE-SFT-GRPO", "MEML-GRPO"],
                               resume=str(record)) == 0
    assert fake_meml["calls"] == [("sft", "MoE-SFT-s2"), ("eval", "MoE-SFT-s2-eval"), ("train", "MoE-SFT-GRPO-s2"),
                                  ("train", "MEML-GRPO-s2")]
    runs, info = read_compare_problems(out / compare.PROBLEMS_FILE)
    assert runs[:3] == kept_runs and [(r.variant, r.seed) for r in runs[3:]] == [
        ("MoE-SFT", 2), ("MoE-SFT-GRPO", 2), ("MEML-GRPO", 2)]
    assert info["rows"][:3] == kept["rows"] and len(info["rows"]) == 6
    md = (out / "compare.md").read_text()
    assert len(_table(md, "## Paired difference to MoE-SFT-GRPO: expert0")["MEML-GRPO"]) == 3  # seeds 1, 2, pooled
    fake_meml["calls"].clear()
    assert compare.run_compare(None, ["train.steps=3"], [1], str(tmp_path / "third"),
                               only=["MoE-SFT-GRPO", "MEML-GRPO", "MEML-no-IML"], resume=str(record)) == 0
    assert fake_meml["calls"] == [("sft", "MoE-SFT-s1"), ("train", "MEML-no-IML-s1")]
    assert compare.run_compare(None, ["train.steps=4"], [1], str(tmp_path / "x"), resume=str(record)) == 2
    per_problem_only = tmp_path / "old.json"
    write_compare_problems(per_problem_only, kept_runs)
    assert compare.run_compare(None, ["train.steps=3"], [1], str(tmp_path / "y"), resume=str(per_problem_only)) == 2
    assert compare.run_compare(None, [], [1], str(tmp_path / "z"), resume=str(tmp_path / "absent.json")) == 2


def test_resume_names_the_record_in_its_error(tmp_path, fake_meml, capsys):
    record = tmp_path / "kept.json"
    assert compare.run_compare(None, [], [1], str(tmp_path / "a"), only=["MEML-GRPO"]) == 0
    record.write_bytes((tmp_path / "a" / compare.PROBLEMS_FILE).read_bytes())
    assert compare.run_compare(None, ["train.steps=4"], [1], str(tmp_path / "b"), resume=str(record)) == 2
    err = capsys.readouterr().err
    assert str(record) in err and "train.steps=4" in err
    good = json.loads(record.read_text())
    for key, value, message in (("overrides", ["train.steps"], "key=value strings, got ['train.steps']"),
                                ("overrides", None, "key=value strings, got None"),
                                ("rows", [{"variant": "MEML-GRPO"}], "rows[0] needs a 'variant' name"),
                                ("rows", {"variant": "x"}, "rows[0] needs")):
        record.write_text(json.dumps(good | {key: value}))
        assert compare.run_compare(None, [], [1], str(tmp_path / "c"), resume=str(record)) == 2
        err = capsys.readouterr().err
        assert str(record) in err and message in err, (key, value, err)


def test_resume_keeps_the_records_dtype_where_auto_picks_another(tmp_path, fake_meml, monkeypatch, capsys):
    """``model.dtype: auto`` picks by machine (fp32 on a CPU, bf16 on a GPU): a compare records the dtype its runs
    used, and resumed where ``auto`` picks otherwise its new runs keep it (said on the console), so that they pair
    with the recorded runs. A record that does not say keeps not saying; a bad dtype is refused. (The toy
    recipes set fp32: ``auto`` comes from an override.)"""
    auto = ["model.dtype=auto"]
    monkeypatch.setattr(compare, "auto_dtype", lambda: ("fp32", "no native bf16"))
    assert compare.run_compare(None, auto, [1], str(tmp_path / "a"), only=["MoE-SFT-GRPO", "MEML-GRPO"]) == 0
    assert set(fake_meml["dtypes"]) == {"fp32"}
    record = tmp_path / "kept.json"
    record.write_bytes((tmp_path / "a" / compare.PROBLEMS_FILE).read_bytes())
    assert read_compare_problems(record)[1]["dtype"] == "fp32"
    monkeypatch.setattr(compare, "auto_dtype", lambda: ("bf16", "native bf16"))
    fake_meml["dtypes"].clear()
    capsys.readouterr()
    assert compare.run_compare(None, auto, [2], str(tmp_path / "b"), only=["MoE-SFT-GRPO", "MEML-GRPO"],
                               resume=str(record)) == 0
    assert len(fake_meml["dtypes"]) == 4 and set(fake_meml["dtypes"]) == {"fp32"}
    assert "used fp32, this machine would pick bf16 (native bf16): the new runs use fp32" in capsys.readouterr().out
    assert read_compare_problems(tmp_path / "b" / compare.PROBLEMS_FILE)[1]["dtype"] == "fp32"
    # without a record, the configured dtype or this machine's choice
    fake_meml["dtypes"].clear()
    assert compare.run_compare(None, ["model.dtype=fp32"], [1], str(tmp_path / "c"), only=["MEML-GRPO"]) == 0
    assert compare.run_compare(None, auto, [1], str(tmp_path / "d"), only=["MEML-GRPO"]) == 0
    assert fake_meml["dtypes"] == ["fp32"] * 3 + ["bf16"] * 3
    unsaid = json.loads(record.read_text())
    del unsaid["dtype"]
    record.write_text(json.dumps(unsaid))
    fake_meml["dtypes"].clear()
    capsys.readouterr()
    assert compare.run_compare(None, auto, [2], str(tmp_path / "e"), only=["MoE-SFT-GRPO", "MEML-GRPO"],
                               resume=str(record)) == 0
    assert set(fake_meml["dtypes"]) == {"bf16"} and "does not say its runs' dtype" in capsys.readouterr().out
    assert "dtype" not in read_compare_problems(tmp_path / "e" / compare.PROBLEMS_FILE)[1]
    record.write_text(json.dumps(unsaid | {"dtype": "int8"}))
    assert compare.run_compare(None, auto, [2], str(tmp_path / "f"), resume=str(record)) == 2
    assert str(record) in capsys.readouterr().err
