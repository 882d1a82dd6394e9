"""`meml demo`: the embedded default end to end on CPU, each stage in its own process (as a user would run them):
MEF SFT (recipes/embedded-default-mef.yaml), then RIEL from the MEF model (recipes/embedded-default.yaml), each
followed by evaluation and a report."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_meml.config import ConfigError, load_config

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "recipes"


def run_demo(recipe_dir: Optional[str], overrides: list[str]) -> int:
    folder = Path(recipe_dir) if recipe_dir else DEFAULT_DIR
    mef, riel = folder / "embedded-default-mef.yaml", folder / "embedded-default.yaml"
    try:
        mef_cfg = load_config(mef, overrides)
        load_config(riel, overrides)
    except ConfigError as e:
        print(f"meml demo: {e}", file=sys.stderr)
        return 2
    mef_model = Path(mef_cfg.output_dir) / mef_cfg.run_name / "final_model"
    t0 = time.perf_counter()
    steps = [("stage 1 (MEF SFT)", ["sft", str(mef), *overrides]),
             ("stage 2 (RIEL)", ["train", str(riel), f"model.megatron_path={mef_model}", *overrides])]
    # vLLM's per-request INFO lines would bury the progress lines; a user's own VLLM_LOGGING_LEVEL wins.
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    for name, argv in steps:
        print(f"[demo] {name}: meml {' '.join(argv)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "megatron_meml.cli", *argv], env=env)
        if rc != 0:
            print(f"[demo] {name} failed with exit code {rc}", file=sys.stderr)
            return rc
    riel_cfg = load_config(riel, overrides)
    run_dir = Path(riel_cfg.output_dir) / riel_cfg.run_name
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s. Reports: {Path(mef_cfg.output_dir) / mef_cfg.run_name}"
          f"/report and {run_dir}/report (summary.md and PNG plots); metrics: {run_dir}/metrics.jsonl", flush=True)
    return 0
