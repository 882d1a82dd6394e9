"""`meml compare`: the paper's main and ablation table at toy scale, at equal rollout budget, over several seeds.

Variants (each a `meml` subprocess, as a user would run it):
  Expert0-SFT   MEF on the ground-truth expert only
  MoE-SFT       MEF on all K experts (stage 1 of every RL variant below, one per seed)
  MoE-SFT-GRPO  RL from MoE-SFT: K experts, standard GRPO (std-normalised advantages, clipped ratio), no MEML parts
  MEML-GRPO     RL from MoE-SFT: the paper's objective + inter-expert mutual learning (as the recipe sets its levers,
                docs/mutual_learning.md) + hard-example SFT
  MEML-no-IML   MEML-GRPO without mutual learning
  MEML-no-HSFT  MEML-GRPO without hard-example SFT
  MEML-GRPO-paper  MEML-GRPO with the mutual-learning term exactly as the paper states it (sequence-summed, full
                weight from step 1, every pair, no strong-expert protection), whatever the recipe sets
  MEML-GRPO-async  MEML-GRPO with asynchronous rollouts one step off-policy (rollout.max_staleness=1)
  DAPO-1exp     RL from MoE-SFT with DAPO (dynamic sampling, clip-higher, token-level loss, soft overlong
                punishment) on expert0 alone: the standard remedy for zero-advantage groups, the baseline MEML must beat
  DAPO-3exp     the same with the K experts as plain GRPO groups
  MEML-GRPO-DS  MEML-GRPO with dynamic sampling
                (the last three at the plain rows' rollout budget in completions: dynamic_variants)
Extra RL variants come from ``--variant "NAME: key=value ..."`` (always run); ``--only`` runs a subset of the
built-in rows (MoE-SFT always runs: it is every RL variant's start).
Every RL variant sees the same problems, samples and steps (equal rollout budget). Every row is evaluated on the same
held-out test problems (the RL recipe's), and on its dev problems when the recipe sets ``data.dev_size``. From each
run's per-problem eval files the tables read three experts (reporting/compare_tables.py): expert0, expert1 and
best-on-dev (the expert best on the dev problems, reported on the test problems; without dev problems, the expert of
highest training reward), each row's test accuracy with a 95% interval, and its paired difference to MoE-SFT-GRPO
per seed (bootstrap over problems) and pooled over seeds (two-level bootstrap). The logged metrics of every run
(``_final_eval``) are tabulated too, as mean ± std over seeds.

Finished runs in ``--out`` are reused, and the seeds of earlier compares there gathered into one table. Without the
run directories (another machine), ``--resume RECORD`` continues from the compare_problems.json an earlier compare
wrote: it carries the rows, the per-problem data, the recipe stamp and the overrides, so its rows join the table and
only the missing (row, seed) pairs run (with their seed's MoE-SFT start again, when one is missing). The record also
says which model dtype its runs used: ``model.dtype: auto`` picks it by machine (bf16 on a GPU, fp32 on a CPU), so a
compare resumed where ``auto`` picks otherwise keeps the record's dtype, and its new rows pair with the recorded ones
on the same numerics.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_meml.config import load_config, recipe_chain
from megatron_meml.errors import ConfigError
from megatron_meml.experiments.defaults import resolve, trace_overrides
from megatron_meml.model.config import DTYPES
from megatron_meml.model.dtype import auto_dtype
from megatron_meml.reporting.compare_tables import (BASELINE, READOUTS, CompareIntervals, RunProblems, best_expert,
                                                    compare_intervals, compare_stats, paired_differences,
                                                    read_compare_problems, run_problems, write_compare_problems,
                                                    write_compare_table)
from megatron_meml.reporting.samples import eval_file, latest_eval_file, read_eval_problems
from megatron_meml.stages.paths import RunPaths

PAPER_MUTUAL = ["algo.mutual_normalise=sequence", "algo.lambda_kl_warmup_steps=0",
                "algo.mutual_min_student_logprob=null", "algo.mutual_teacher_nll=0.0"]
"""The mutual-learning levers set to the paper's behaviour."""
RL_VARIANTS = {
    "MoE-SFT-GRPO": ["algo.mutual_learning=false", "hard_examples.enabled=false", "algo.advantage=grpo",
                     "algo.policy_loss=clipped"],
    "MEML-GRPO": [],
    "MEML-no-IML": ["algo.mutual_learning=false"],
    "MEML-no-HSFT": ["hard_examples.enabled=false"],
    "MEML-GRPO-paper": PAPER_MUTUAL,
    "MEML-GRPO-async": ["rollout.max_staleness=1"],
    # The paper's formulas as one objective (docs/method.md, "Total loss"): the policy term over every sample, each
    # transferred or hard-example token weighing lambda times a sampled one, the mutual levers as the paper states.
    "MEML-GRPO-paper-norm": [*PAPER_MUTUAL, "algo.advantage=paper", "algo.policy_loss=paper_pg",
                             "algo.aggregation=token_mean", "algo.pg_normaliser=all", "algo.aux_normaliser=policy",
                             "algo.sft_aggregation=token_mean", "algo.lambda_kl=1.0", "algo.lambda_sft=1.0"],
}
SFT_VARIANTS = {"Expert0-SFT": ["algo.num_experts=1"], "MoE-SFT": []}
DAPO = ["algo.mutual_learning=false", "hard_examples.enabled=false", "algo.advantage=grpo", "algo.policy_loss=clipped",
        "algo.clip_low=0.2", "algo.clip_high=0.28", "algo.aggregation=token_mean", "algo.dynamic_sampling=true",
        "algo.dynamic_sampling_on_exhausted=train"]
"""DAPO (arXiv 2503.14476): clip-higher, token-level loss, dynamic sampling, soft overlong punishment, no KL."""
DYNAMIC_ROWS = ("DAPO-1exp", "DAPO-3exp", "MEML-GRPO-DS")


def dynamic_variants(base) -> dict[str, list[str]]:
    """The dynamic-sampling rows, at the plain rows' rollout budget (completions, not steps): train.rollout_budget
    = steps x problems x K x G of the recipe, and enough steps for refills to spend it. DAPO-1exp trains one expert
    (expert0) on K times the questions per batch, so a generation batch has the same completions; DAPO-3exp keeps
    the K experts as plain GRPO groups; MEML-GRPO-DS is MEML-GRPO with dynamic sampling."""
    tr, k, g = base.train, base.algo.num_experts, base.rollout.samples_per_expert
    budget = tr.steps * tr.problems_per_step * k * g
    equal = [f"train.rollout_budget={budget}", f"train.steps={tr.steps * base.algo.dynamic_sampling_max_gen_batches}"]
    overlong = [f"reward.overlong_buffer={max(1, base.rollout.max_new_tokens // 5)}", "reward.overlong_penalty=1.0"]
    return {"DAPO-1exp": [*DAPO, *overlong, *equal, "algo.num_experts=1",
                          f"train.problems_per_step={tr.problems_per_step * k}"],
            "DAPO-3exp": [*DAPO, *overlong, *equal],
            "MEML-GRPO-DS": ["algo.dynamic_sampling=true", "algo.dynamic_sampling_on_exhausted=train", *equal]}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME: key=value key=value"`` -> (NAME, overrides)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or " " in name or name in SFT_VARIANTS:
        raise ValueError(f"--variant '{text}': expected 'NAME: key=value ...' with a new one-word NAME")
    overrides = rest.split()
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant '{name}': '{bad[0]}' is not a key=value override")
    return name, overrides


def recipe_stamp(mef: Path, riel: Path) -> dict[str, str]:
    """What reuse of a finished run is checked against: ``settings``, the sha256 of what the recipe pair's files and
    the other files their ``base:`` chains name set (each file parsed, so an edited comment or layout reruns
    nothing, an edited value everything); and, for stamps written before ``settings`` was, ``recipes`` and
    ``bases``, the sha256 of those files' bytes."""
    own = [mef.resolve(), riel.resolve()]
    settings = {path.resolve(): data for r in (mef, riel) for path, data in recipe_chain(r)}
    bases = sorted(set(settings) - set(own))
    h, parsed = hashlib.sha256(), hashlib.sha256()
    for path in bases:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for path in [*own, *bases]:
        text = json.dumps(settings[path], sort_keys=True, default=str)
        parsed.update(path.name.encode() + b"\0" + text.encode() + b"\0")
    return {"recipes": hashlib.sha256(mef.read_bytes() + riel.read_bytes()).hexdigest(), "bases": h.hexdigest(),
            "settings": parsed.hexdigest()}


def _same_recipes(old: dict, stamp: dict[str, str]) -> bool:
    """``old`` (a stamp written by an earlier compare) was made on recipe files of the same settings as ``stamp``'s.
    Stamps from before ``settings`` was recorded are judged on the files' bytes, and those from before the base
    chain was recorded on the two files alone."""
    if "settings" in old:
        return old["settings"] == stamp["settings"]
    return old.get("recipes") == stamp["recipes"] and old.get("bases", stamp["bases"]) == stamp["bases"]


def _portable(argv: list[str]) -> list[str]:
    """A run's command with its recipe (argv[1]) named by file name, not path: a compare from another checkout of
    the same recipe files (their contents are in the stamp) reuses the runs."""
    return [argv[0], Path(argv[1]).name, *argv[2:]] if len(argv) > 1 else list(argv)


def _meml(argv: list[str], log: Path, stamp: dict[str, str]) -> None:
    """Run one ``meml`` subprocess; skipped when an earlier compare finished the same command on the same recipe
    files (argv and ``stamp``, from recipe_stamp, are kept next to the log), so an interrupted or extended compare
    reuses what it already has."""
    done = log.with_suffix(".done.json")
    if done.exists():
        old = json.loads(done.read_text())
        if _portable(old.get("argv", [])) == _portable(argv) and _same_recipes(old, stamp):
            return
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "megatron_meml.cli", *argv], stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"meml {' '.join(argv[:2])} failed (exit {rc}); see {log}")
    done.write_text(json.dumps({"argv": argv, **stamp}))


ROWS_STAMP = "compare_rows.stamp.json"
"""Next to compare_rows.json: the recipe_stamp its rows were run on."""
PROBLEMS_FILE = "compare_problems.json"
"""Next to compare_rows.json: every row's per-problem correctness per seed, read-out and split
(reporting/compare_tables.py)."""


def _earlier_on_same_recipes(root: Path, stamp: dict[str, str], name: str) -> Optional[Path]:
    """``root / name`` when an earlier compare wrote it on the same recipe files (else None)."""
    old, prev = root / name, root / ROWS_STAMP
    ok = old.is_file() and prev.is_file() and _same_recipes(json.loads(prev.read_text()), stamp)
    return old if ok else None


def _with_earlier_rows(root: Path, stamp: dict[str, str], rows: list[dict]) -> list[dict]:
    """The rows of earlier compares in ``root`` on the same recipe files (their finished runs), with this
    compare's rows in place of the same (variant, seed) and after them: so ``--seeds 1`` one day and ``--seeds 2,3``
    tomorrow give one table over three seeds. Rows of other recipe files are left out."""
    old = _earlier_on_same_recipes(root, stamp, "compare_rows.json")
    if old is None:
        return rows
    new = {(r["variant"], r["seed"]): r for r in rows}
    earlier = [new.pop((r["variant"], r["seed"]), r) for r in json.loads(old.read_text())]
    return earlier + list(new.values())


def _override_map(overrides: Sequence[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


def _resume(root: Path, record: Path, stamp: dict[str, str],
            overrides: list[str]) -> tuple[set[tuple[str, int]], Optional[str]]:
    """Continue a compare from its record (the compare_problems.json a compare writes, with its rows, recipe stamp,
    overrides and dtype: the file to keep, e.g. committed next to the results, when the run directories are gone):
    checks it was made on the same recipe files with the same overrides, adds its rows and per-problem data to
    ``root``'s (where ``root`` lacks them) and returns its (variant, seed) pairs, which this compare does not run
    again, and the model dtype its runs used (None where it does not say)."""
    try:
        runs, info = read_compare_problems(record)
    except OSError as e:
        raise ValueError(f"--resume {record}: {e.strerror}") from None
    if "rows" not in info or "recipes" not in info or "overrides" not in info:
        raise ValueError(f"--resume {record}: no rows, recipe stamp or overrides in it (a per-problem file only, "
                         "not a compare record)")
    given = info["overrides"]
    if not isinstance(given, list) or not all(isinstance(o, str) and "=" in o for o in given):
        raise ValueError(f"--resume {record}: overrides must be a list of key=value strings, got {given!r}")
    for i, row in enumerate(info["rows"] if isinstance(info["rows"], list) else [None]):
        if not isinstance(row, dict) or not isinstance(row.get("variant"), str) or not isinstance(row.get("seed"), int):
            raise ValueError(f"--resume {record}: rows[{i}] needs a 'variant' name and an integer 'seed'")
    if not _same_recipes(info["recipes"], stamp):
        raise ValueError(f"--resume {record}: made on other recipe files than the default's current ones; its rows "
                         "would not be the same experiment")
    if _override_map(info["overrides"]) != _override_map(overrides):
        raise ValueError(f"--resume {record}: made with overrides {' '.join(info['overrides']) or '(none)'}, not "
                         f"{' '.join(overrides) or '(none)'}")
    kept, concrete = info.get("dtype"), [d for d in DTYPES if d != "auto"]
    if kept is not None and kept not in concrete:
        raise ValueError(f"--resume {record}: dtype must be one of {concrete}, got {kept!r}")
    here = _earlier_on_same_recipes(root, stamp, "compare_rows.json")
    rows = json.loads(here.read_text()) if here else []
    have = {(r["variant"], int(r["seed"])) for r in rows}
    rows += [r for r in info["rows"] if (r["variant"], int(r["seed"])) not in have]
    probs = _earlier_on_same_recipes(root, stamp, PROBLEMS_FILE)
    mine = read_compare_problems(probs)[0] if probs else []
    have = {(r.variant, r.seed) for r in mine}
    (root / "compare_rows.json").write_text(json.dumps(rows, indent=1))
    write_compare_problems(root / PROBLEMS_FILE, mine + [r for r in runs if (r.variant, r.seed) not in have],
                           record=_record(stamp, overrides, rows, kept))
    (root / ROWS_STAMP).write_text(json.dumps(stamp))
    return {(r["variant"], int(r["seed"])) for r in info["rows"]}, kept


def _record(stamp: dict[str, str], overrides: list[str], rows: list[dict], dtype: Optional[str]) -> dict:
    """The compare-record fields of compare_problems.json (``dtype`` left out where it is not known)."""
    return {"recipes": stamp, "overrides": overrides, "rows": rows} | ({"dtype": dtype} if dtype else {})


def _dtype_to_use(configured: str, kept: Optional[str], resumed: bool) -> str:
    """The model dtype of this compare's runs: the configured one, or for ``auto`` this machine's choice, except
    that a resumed compare keeps its record's (printed when that differs from this machine's choice)."""
    mine, why = auto_dtype() if configured == "auto" else (configured, "configured")
    if kept is None:
        if resumed:
            print(f"[compare] the record does not say its runs' dtype; the new runs use {mine}: their paired "
                  "differences mean something only if the recorded runs used it too", flush=True)
        return mine
    if kept != mine:
        print(f"[compare] the record's runs used {kept}, this machine would pick {mine} ({why}): the new runs use "
              f"{kept}, so that they pair with the recorded ones", flush=True)
    return kept


def _eval_dir(root: Path, variant: str, seed: int) -> Path:
    """Where a row's evaluation ran: the SFT rows' ``meml eval`` run, the RL rows' own run."""
    return root / (f"{variant}-s{seed}-eval" if variant in SFT_VARIANTS else f"{variant}-s{seed}")


def _gather_runs(root: Path, stamp: dict[str, str], rows: list[dict], expert_ids: Sequence[str]) -> list[RunProblems]:
    """Per-problem read-outs of every row, in the rows' order: from the run's eval files, else from an earlier
    compare's PROBLEMS_FILE on the same recipe files; rows with neither are left out (the table lists them)."""
    old = _earlier_on_same_recipes(root, stamp, PROBLEMS_FILE)
    earlier = {(r.variant, r.seed): r for r in (read_compare_problems(old)[0] if old else [])}
    runs = []
    for row in rows:
        v, seed = row["variant"], int(row["seed"])
        got = _run_problems(v, seed, _eval_dir(root, v, seed), expert_ids) or earlier.get((v, seed))
        if got is not None:
            runs.append(got)
    return runs


def _drop_checkpoints(run_dir: Path, keep: bool) -> None:
    """A finished run's resumable checkpoints (model and optimizer state: 3.6 GB per real-model run) once its final
    model and metrics are written, which are all the table, the RL starts and a reuse read; ``keep``: leave them."""
    paths = RunPaths(run_dir)
    ckpt = paths.checkpoints
    if not keep and paths.final_model.is_dir() and ckpt.is_dir():
        shutil.rmtree(ckpt)


REWARD_WINDOW = 10
"""acc_reward_best picks the expert with the highest mean sampled reward over the last this many RIEL steps."""


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in RunPaths(run_dir).metrics.read_text().splitlines() if x.strip()]


def _accuracies(record: dict, dev: bool) -> dict[str, float]:
    """expert id (and best_expert) -> greedy accuracy in one eval record, on the test problems or (``dev``) the dev
    problems (``eval/dev/<expert>/accuracy``)."""
    keys = [k.split("/") for k in record if k.startswith("eval/") and k.endswith("/accuracy")]
    return {p[2]: record["/".join(p)] for p in keys if len(p) == 4 and (p[1] == "dev") == dev}


def _reward_pick(rows: Sequence[dict], experts: Sequence[str], expert0: str) -> Optional[str]:
    """The expert with the highest training reward over the last REWARD_WINDOW RIEL steps (None: no RIEL steps)."""
    recent = [r for r in rows if r["stage"] == "train"][-REWARD_WINDOW:]
    reward = {e: sum(r.get(f"expert/{e}/reward_mean", 0.0) for r in recent) for e in experts}
    if recent and any(f"expert/{e}/reward_mean" in r for r in recent for e in reward):
        return max(reward, key=lambda e: (reward[e], e == expert0))
    return None


def _final_eval(run_dir: Path, expert0: str) -> dict[str, float]:
    """acc_expert0; acc_best_expert (the expert best on the held-out problems themselves: optimistic); for RL runs
    acc_reward_best (the expert with the highest training reward over the last REWARD_WINDOW steps, chosen without
    looking at the held-out problems); with dev problems acc_best_on_dev (the expert best on them, on the test
    problems); acc_<id> for each other expert (how the weak experts move)."""
    rows = _metrics(run_dir)
    evals = [r for r in rows if r["stage"] == "eval"]
    if not evals:
        raise RuntimeError(f"{run_dir}: no evaluation was logged")
    acc, dev = _accuracies(evals[-1], dev=False), _accuracies(evals[-1], dev=True)
    out = {"acc_expert0": acc[expert0], "acc_best_expert": acc["best_expert"]}
    pick = _reward_pick(rows, [e for e in acc if e != "best_expert"], expert0)
    if pick is not None:
        out["acc_reward_best"] = acc[pick]
    dev.pop("best_expert", None)
    if dev:
        out["acc_best_on_dev"] = acc[best_expert(dev)]
    out.update({f"acc_{e}": v for e, v in acc.items() if e not in (expert0, "best_expert")})
    return out


def _run_problems(variant: str, seed: int, run_dir: Path, expert_ids: Sequence[str]) -> Optional[RunProblems]:
    """The run's read-outs from its latest per-problem eval files (test, and dev when present); None when it has
    none (evaluated before they were written)."""
    path = latest_eval_file(run_dir)
    if path is None:
        return None
    test = read_eval_problems(path)
    dev_path = eval_file(run_dir, int(path.stem.removeprefix("step_")), "dev")
    dev = read_eval_problems(dev_path) if dev_path.is_file() else []
    pick = None
    if not dev and test and RunPaths(run_dir).metrics.is_file():
        pick = _reward_pick(_metrics(run_dir), list(test[0].rewards), expert_ids[0])
    return run_problems(variant, seed, test, dev, expert_ids, pick)


def _traces(mef: Path, overrides: list[str], root: Path, recipes: dict[str, str]) -> list[str]:
    """Teacher traces for the MEF experts without gold solutions, drawn once for every seed (they are data, as the
    paper's offline teacher traces are); returns the MEF overrides that name the trace files."""
    out = root / "traces"
    _meml(["traces", str(mef), *overrides, f"output_dir={root}", "run_name=traces", f"traces.out_dir={out}",
           "logging.progress=off"], root / "traces.log", recipes)
    return trace_overrides(out)


def _select_variants(riel: Path, base, overrides: list[str], variants: list[str], only: Optional[list[str]]):
    """(SFT rows, RL rows) to run, each name -> overrides; every --variant's overrides (and the dynamic-sampling
    rows') are checked against the recipe here, so a bad key fails before an hour of runs. ``base``: the RIEL
    recipe with ``overrides``, loaded."""
    builtin = RL_VARIANTS | dynamic_variants(base)
    extra_rl = dict(parse_variant(text) for text in variants)
    for name in [*extra_rl, *DYNAMIC_ROWS]:
        load_config(riel, [*overrides, *(extra_rl.get(name) or builtin[name])])
    if only:
        unknown = sorted(set(only) - set(builtin) - set(SFT_VARIANTS) - set(extra_rl))
        if unknown:
            known = sorted(set(builtin) | set(SFT_VARIANTS))
            raise ValueError(f"--only: unknown variant(s) {unknown}; known: {known} and the --variant names")
    sft = {k: v for k, v in SFT_VARIANTS.items() if not only or k in only or k == "MoE-SFT"}
    return sft, {k: v for k, v in builtin.items() if not only or k in only} | extra_rl


def run_compare(recipe_dir: Optional[str], overrides: list[str], seeds: list[int], out: Optional[str], *,
                variants: Optional[list[str]] = None, only: Optional[list[str]] = None, default: str = "toy",
                keep_checkpoints: bool = False, resume: Optional[str] = None) -> int:
    try:
        d, mef, riel = resolve(default, recipe_dir)
        base = load_config(riel, overrides)
        sft_runs, rl = _select_variants(riel, base, overrides, variants or [], only)
        recipes = recipe_stamp(mef, riel)
        root = Path(out or Path(base.output_dir) / "compare")
        root.mkdir(parents=True, exist_ok=True)
        finished, kept = _resume(root, Path(resume), recipes, overrides) if resume else (set(), None)
    except (ConfigError, ValueError) as e:
        print(f"meml compare: {e}", file=sys.stderr)
        return 2
    dtype = _dtype_to_use(base.model.dtype, kept, bool(resume))
    known = dtype if kept or not resume else None  # a record that did not say keeps not saying
    expert0 = base.experts.ids[0]
    rows = []
    t0 = time.perf_counter()
    # traces are data drawn once for one set of train problems: such defaults fix the problems over the seeds
    teacher = d.traces == "teacher"
    pinned = [f"data.seed={base.seed if base.data.seed is None else base.data.seed}"] if teacher else []
    traces = _traces(mef, [*overrides, *pinned, f"model.dtype={dtype}"], root, recipes) if teacher else []
    for seed in seeds:
        common = [*overrides, *pinned, f"model.dtype={dtype}", f"seed={seed}", f"output_dir={root}",
                  "logging.progress=off"]
        # a start is needed when some RL row of this seed is not finished in the resumed record
        start = any((v, seed) not in finished for v in rl)
        for variant, extra in sft_runs.items():
            name = f"{variant}-s{seed}"
            if (variant, seed) in finished and not (start and variant == "MoE-SFT"):
                continue
            _meml(["sft", str(mef), *common, f"run_name={name}", "eval.max_problems=0", *traces, *extra],
                  root / f"{name}.log", recipes)
            _drop_checkpoints(root / name, keep_checkpoints)
            if (variant, seed) in finished:
                continue  # rerun only as the RL rows' start: its row is the record's
            # evaluated on the RL recipe's held-out problems, like the RL variants (same problems for every row)
            _meml(["eval", str(riel), *common, f"run_name={name}-eval", *extra, "--checkpoint",
                   str(RunPaths(root / name).final_model)], root / f"{name}-eval.log", recipes)
            rows.append({"variant": variant, "seed": seed, **_final_eval(root / f"{name}-eval", expert0)})
            print(f"[compare] {name}: {rows[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        moe = RunPaths(root / f"MoE-SFT-s{seed}").final_model
        for variant, extra in rl.items():
            name = f"{variant}-s{seed}"
            if (variant, seed) in finished:
                continue
            _meml(["train", str(riel), *common, f"run_name={name}", f"model.megatron_path={moe}", *extra],
                  root / f"{name}.log", recipes)
            _drop_checkpoints(root / name, keep_checkpoints)
            rows.append({"variant": variant, "seed": seed, **_final_eval(root / name, expert0)})
            print(f"[compare] {name}: {rows[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = _with_earlier_rows(root, recipes, rows)
    runs = _gather_runs(root, recipes, rows, base.experts.ids)
    (root / "compare_rows.json").write_text(json.dumps(rows, indent=1))
    record = _record(recipes, overrides, rows, known)
    write_compare_problems(root / PROBLEMS_FILE, runs, record=record)
    (root / ROWS_STAMP).write_text(json.dumps(recipes))
    intervals = compare_intervals(runs) if runs else None
    write_compare_table(rows, root, runs=runs, intervals=intervals)
    _print_summary(rows, intervals, time.perf_counter() - t0)
    print(f"[compare] tables: {root / 'compare.md'}, plot: {root / 'compare.png'}, per-problem data: "
          f"{root / PROBLEMS_FILE}")
    return 0


def _print_summary(rows: list[dict], intervals: Optional[CompareIntervals], seconds: float) -> None:
    print(f"[compare] {len({r['seed'] for r in rows})} seeds, {seconds:.0f} s; held-out greedy accuracy (mean ± std):")
    for variant, per in compare_stats(rows).items():
        cells = "  ".join(f"{m} {mu:.3f} ± {sd:.3f}" if n > 1 else f"{m} {mu:.3f} (one seed)"
                          for m, (mu, sd, n) in per.items())
        print(f"  {variant:14s} {cells}")
    if intervals is not None and intervals.pooled:
        print(f"[compare] paired difference to {intervals.baseline} on the test problems, pooled over seeds (95% "
              "bootstrap interval):")
        for v in dict.fromkeys(k[0] for k in intervals.pooled):
            print(f"  {v:14s} " + "  ".join(f"{ro} {intervals.pooled[v, ro].signed()}" for ro in READOUTS
                                           if (v, ro) in intervals.pooled))
        return
    paired = paired_differences(rows, BASELINE, "acc_expert0")
    if paired:
        print(f"[compare] Expert0-prompt accuracy minus {BASELINE}'s on the same seed (mean ± std):")
        for variant, (mu, sd, n) in paired.items():
            print(f"  {variant:14s} {mu:+.3f} ± {sd:.3f} ({n} seeds)")
