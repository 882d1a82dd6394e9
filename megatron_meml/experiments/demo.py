"""`meml demo`: an embedded default end to end, each training stage in its own process as a user would run it.

The terminal shows the project's own progress: a line per stage with the elapsed time and an estimate of what is
left, the stages' step and evaluation lines, and at the end the summary table (``reporting.summary``). Everything
the processes print, the libraries' output included, goes to ``<RIEL run>/demo.log``; a failing stage shows its
last lines and where the log is.

Defaults (``experiments.defaults``):
- ``smollm2-styles`` (the default): SmolLM2-135M-Instruct, three experts each taught one style of the gold work.
  The model fetch, then MEF (``meml sft``: the base model and the MEF model are evaluated on the RIEL recipe's
  held-out problems before and after), then RIEL (``meml train``, evaluated at the end).
- ``smollm2`` / ``smollm2-sparse``: experts 1 and 2 learn the base model's own verified answers (``meml traces``);
  the base and MEF evaluations run as their own ``meml eval`` processes.
- ``toy``: a 0.6M-parameter model trained from scratch: MEF, then RIEL.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from checkpoints_convert.models import MODELS, fetch, is_fetched
from megatron_meml.config import MemlConfig, load_config
from megatron_meml.errors import RunError
from megatron_meml.experiments.defaults import EmbeddedDefault, resolve, trace_overrides
from megatron_meml.model.dtype import for_this_machine
from megatron_meml.reporting.summary import EvalPoint, pipeline_summary
from megatron_meml.stages.paths import RunPaths

OWN_LINES = ("[sft]", "[train]", "[eval]", "[traces]", "[report]", "[resume]", "[fetch]", "meml ")
"""Lines of a stage's output that are the project's own progress: shown in the terminal (all go to the log)."""


@dataclass
class Stage:
    """One step of the demo: a ``meml`` subprocess (``argv``, or a callable giving it once earlier stages ran) or
    work done here (``run``)."""

    name: str
    expected_s: float
    """Seconds on the reference machine (2 cores, AVX2, fp32): the basis of the time-left estimate."""
    argv: Optional[Callable[[], list[str]]] = None
    run: Optional[Callable[[], None]] = None
    seconds: float = field(default=0.0, init=False)


@dataclass
class Plan:
    """What the demo runs and where its results land."""

    stages: list[Stage]
    evals: list[EvalPoint]
    """The evaluations on the shared held-out problems, in pipeline order (empty: no summary table)."""
    mef: RunPaths
    riel: RunPaths


def run_demo(recipe_dir: Optional[str], overrides: list[str], default: str = "smollm2-styles") -> int:
    d, mef_recipe, riel_recipe = resolve(default, recipe_dir)
    mef_cfg, riel_cfg = load_config(mef_recipe, overrides), load_config(riel_recipe, overrides)
    plan = plan_demo(d, mef_recipe, riel_recipe, mef_cfg, riel_cfg, overrides)
    plan.riel.root.mkdir(parents=True, exist_ok=True)
    log = plan.riel.root / "demo.log"
    dtype = for_this_machine(riel_cfg).model.dtype
    print(f"[demo] {d.name}: {d.what}; model.dtype={dtype}. Everything the stages print goes to {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8", buffering=1) as log_file:  # line-buffered: `tail -f` follows it
        for i, stage in enumerate(plan.stages, start=1):
            print(f"[demo {i}/{len(plan.stages)}] {stage.name} ...", flush=True)
            t = time.perf_counter()
            if stage.run is not None:
                stage.run()
            else:
                rc = _run_logged(stage.argv(), log_file)
                if rc != 0:
                    print(f"[demo] {stage.name} failed with exit code {rc}; its last lines are above, the whole "
                          f"output is in {log}", file=sys.stderr, flush=True)
                    return rc
            stage.seconds = time.perf_counter() - t
            elapsed = time.perf_counter() - t0
            print(f"[demo {i}/{len(plan.stages)}] {stage.name}: {stage.seconds:.0f} s (elapsed {_mmss(elapsed)}, "
                  f"{_left(plan.stages, i)} left)", flush=True)
    where = [f"Report and plots: {plan.riel.report}/ (RIEL) and {plan.mef.report}/ (MEF); metrics: "
             f"{plan.riel.metrics}; the stages' whole output: {log}."]
    seconds = {s.name: s.seconds for s in plan.stages}
    if plan.evals:
        table = pipeline_summary(plan.evals, riel_cfg.experts.ids[:riel_cfg.algo.num_experts], riel_run=plan.riel.root,
                                 stage_seconds=seconds, styles=dict(riel_cfg.experts.styles), where=where)
        summary = plan.riel.report / "summary.md"
        if summary.is_file():
            summary.write_text(table + "\n" + summary.read_text())
        print(table, end="", flush=True)
    else:
        print("\n".join(where), flush=True)
    print(f"[demo] done in {_mmss(time.perf_counter() - t0)}", flush=True)
    return 0


def plan_demo(d: EmbeddedDefault, mef: Path, riel: Path, mef_cfg: MemlConfig, riel_cfg: MemlConfig,
              overrides: list[str]) -> Plan:
    """The stages of default ``d`` (recipes already resolved and loaded with ``overrides``)."""
    m, r = RunPaths.of(mef_cfg), RunPaths.of(riel_cfg)
    common = [*overrides, "logging.progress=line"]
    train = Stage("RIEL", d.expected_s.get("riel", 0.0),
                  argv=lambda: ["train", str(riel), *common, f"model.megatron_path={m.final_model}"])
    if d.traces is None:  # the toy: no pretrained model, no shared held-out problems
        sft = Stage("MEF", d.expected_s.get("mef", 0.0), argv=lambda: ["sft", str(mef), *common])
        return Plan([sft, train], [], m, r)
    stages = [Stage("model", d.expected_s.get("model", 0.0), run=lambda: ensure_model(riel_cfg))]
    riel_step = riel_cfg.train.steps
    if d.traces == "rendered":
        sft = Stage("MEF on each expert's gold work in its own style, the base and MEF models evaluated",
                    d.expected_s.get("mef", 0.0),
                    argv=lambda: ["sft", str(mef), *common, "eval.at_start=true"])
        evals = [EvalPoint("base", m.root, 0), EvalPoint("after MEF", m.root, mef_cfg.train.sft_steps),
                 EvalPoint("after RIEL", r.root, riel_step)]
        return Plan([*stages, sft, train], evals, m, r)
    base_eval, mef_eval = r.root.with_name(f"{r.root.name}-base"), r.root.with_name(f"{r.root.name}-mef-eval")
    stages += [
        Stage("teacher traces", d.expected_s.get("traces", 0.0), argv=lambda: ["traces", str(mef), *common]),
        Stage("base model evaluated", d.expected_s.get("base_eval", 0.0),
              argv=lambda: ["eval", str(riel), *common, f"run_name={base_eval.name}"]),
        Stage("MEF", d.expected_s.get("mef", 0.0),
              argv=lambda: ["sft", str(mef), *common, "eval.max_problems=0", *trace_overrides(m.traces)]),
        Stage("MEF model evaluated", d.expected_s.get("mef_eval", 0.0),
              argv=lambda: ["eval", str(riel), *common, f"run_name={mef_eval.name}", "--checkpoint",
                            str(m.final_model)])]
    evals = [EvalPoint("base", base_eval, 0), EvalPoint("after MEF", mef_eval, 0),
             EvalPoint("after RIEL", r.root, riel_step)]
    return Plan([*stages, train], evals, m, r)


def ensure_model(cfg: MemlConfig) -> None:
    """model.hf_path exists, or is fetched when it names a registry model (``python -m checkpoints_convert fetch``)."""
    path = Path(cfg.model.hf_path)
    entry = next((e for e in MODELS.values() if e.hf_dir == path.name), None)
    if entry is not None and not is_fetched(entry, path):
        fetch(entry, path, log=lambda line: print(line, flush=True))
    elif not (path / "config.json").is_file():
        raise RunError(f"model.hf_path={path}: no model there (config.json missing)")


def _run_logged(argv: list[str], log_file) -> int:
    """Run ``meml ARGV`` with its output into ``log_file``; its own progress lines also to the terminal, and its
    last lines too when it fails."""
    # vLLM's per-request INFO lines would bury the log; a user's own VLLM_LOGGING_LEVEL wins
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           "PYTHONUNBUFFERED": "1"}
    log_file.write(f"$ meml {' '.join(argv)}\n")
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen([sys.executable, "-m", "megatron_meml.cli", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env, text=True, errors="replace") as proc:
        for line in proc.stdout:
            log_file.write(line)
            tail.append(line)
            if line.startswith(OWN_LINES):
                print("  " + line, end="", flush=True)
        rc = proc.wait()
    log_file.flush()
    if rc != 0:
        sys.stderr.write("".join(tail))
    return rc


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _left(stages: list[Stage], done: int) -> str:
    """Estimated time left: the remaining stages' reference times scaled by how this machine compared so far."""
    ran = [s for s in stages[:done] if s.expected_s >= 30]  # a stage of a few seconds says nothing of the machine
    ref = sum(s.expected_s for s in ran)
    scale = sum(s.seconds for s in ran) / ref if ref > 0 else 1.0
    left = sum(s.expected_s for s in stages[done:]) * scale
    return f"about {_mmss(left)}" if done < len(stages) else "nothing"
