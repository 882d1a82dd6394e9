"""`meml demo`: an embedded default end to end on CPU, each stage in its own process (as a user would run them).

``--default toy``: MEF SFT (recipes/embedded-default-mef.yaml), then RIEL from the MEF model
(recipes/embedded-default.yaml), each followed by evaluation and a report.
``--default smollm2``: the real pretrained model: teacher traces for expert1/expert2 (``meml traces``), MEF SFT on
them and the gold solutions, then RIEL; the base model, the MEF model and the RIEL model are evaluated on the same
held-out problems (the RIEL recipe's) and a before/after table is written next to the RIEL report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_meml.config import ConfigError, load_config
from megatron_meml.defaults import resolve, trace_overrides


def run_demo(recipe_dir: Optional[str], overrides: list[str], default: str = "toy") -> int:
    try:
        d, mef, riel = resolve(default, recipe_dir)
        mef_cfg, riel_cfg = load_config(mef, overrides), load_config(riel, overrides)
    except (ConfigError, ValueError) as e:
        print(f"meml demo: {e}", file=sys.stderr)
        return 2
    mef_dir = Path(mef_cfg.output_dir) / mef_cfg.run_name
    run_dir = Path(riel_cfg.output_dir) / riel_cfg.run_name
    t0 = time.perf_counter()
    # vLLM's per-request INFO lines would bury the progress lines; a user's own VLLM_LOGGING_LEVEL wins.
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    evals = {}
    for name, argv in _stages(d, mef, riel, overrides, mef_dir, run_dir, evals):
        argv = argv() if callable(argv) else argv
        print(f"[demo] {name}: meml {' '.join(argv)}", flush=True)
        t_stage = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "megatron_meml.cli", *argv], env=env)
        if rc != 0:
            print(f"[demo] {name} failed with exit code {rc}", file=sys.stderr)
            return rc
        print(f"[demo] {name}: {time.perf_counter() - t_stage:.0f} s", flush=True)
    if evals:
        evals["after RIEL"] = run_dir
        table = before_after_table(evals, riel_cfg.experts.ids[:riel_cfg.algo.num_experts], riel_cfg.data.source)
        (run_dir / "report").mkdir(parents=True, exist_ok=True)
        (run_dir / "report" / "before_after.md").write_text(table)
        print(table, end="", flush=True)
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s. Reports: {mef_dir}/report and {run_dir}/report "
          f"(summary.md and PNG plots); metrics: {run_dir}/metrics.jsonl", flush=True)
    return 0


def _stages(d, mef: Path, riel: Path, overrides: list[str], mef_dir: Path, run_dir: Path, evals: dict):
    """(name, argv or a callable giving argv once the earlier stages ran) for each stage of default ``d``; the
    evaluation run dirs go into ``evals`` (label -> run dir) as their stages come up."""
    mef_model, riel_name = mef_dir / "final_model", run_dir.name
    if not d.traces:
        yield "stage 1 (MEF SFT)", ["sft", str(mef), *overrides]
        yield "stage 2 (RIEL)", ["train", str(riel), f"model.megatron_path={mef_model}", *overrides]
        return
    yield "teacher traces", ["traces", str(mef), *overrides]
    yield "base model on the held-out problems", ["eval", str(riel), *overrides, f"run_name={riel_name}-base"]
    evals["base model"] = run_dir.parent / f"{riel_name}-base"
    yield "stage 1 (MEF SFT)", lambda: ["sft", str(mef), *overrides, "eval.max_problems=0",
                                        *trace_overrides(mef_dir / "traces")]
    yield "MEF model on the held-out problems", ["eval", str(riel), *overrides, f"run_name={riel_name}-mef-eval",
                                                 "--checkpoint", str(mef_model)]
    evals["after MEF"] = run_dir.parent / f"{riel_name}-mef-eval"
    yield "stage 2 (RIEL)", ["train", str(riel), f"model.megatron_path={mef_model}", *overrides]


def before_after_table(runs: dict[str, Path], expert_ids: list[str], bench: str) -> str:
    """Markdown: greedy held-out accuracy per expert (and the last-number read-out where logged) of each run's last
    evaluation."""
    lines = ["| model | " + " | ".join(expert_ids) + " |", "| --- |" + " --- |" * len(expert_ids)]
    for label, run_dir in runs.items():
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        last = [r for r in rows if r.get("stage") == "eval"][-1]
        cells = []
        for eid in expert_ids:
            cell = f"{last[f'eval/{bench}/{eid}/accuracy']:.3f}"
            lenient = last.get(f"eval/{bench}/{eid}/last_number_accuracy")
            cells.append(cell + (f" ({lenient:.3f})" if lenient is not None else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n = int(last.get("eval/num_problems", 0))
    return (f"Held-out greedy accuracy, {n} problems (in brackets: the last number of the completion scored "
            "instead of the answer line)\n\n" + "\n".join(lines) + "\n")
