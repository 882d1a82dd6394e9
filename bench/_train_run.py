"""One short `meml train` subprocess for the benches that compare whole runs (async_step.py, precision_memory.py):
the same quiet settings on every side, the log kept next to the run, the metrics read back and the run directory
deleted (on the real model it holds a checkpoint and the engine's copy of the weights, GBs per side)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["checkpoint.save_every=0", "eval.max_problems=0", "logging.tensorboard=false", "logging.progress=line"]


def train_rows(recipe: str, overrides: list[str], *, steps: int, threads: int, out: Path, name: str,
               poll: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Run ``meml train recipe`` with ``overrides`` for ``steps`` steps at ``threads`` threads under ``out/name``
    and return its train-stage metric rows. ``poll(pid)``, when given, is called every 0.5 s while it runs."""
    cmd = [sys.executable, "-m", "megatron_meml.cli", "train", recipe, f"train.steps={steps}",
           f"train.threads={threads}", *QUIET, f"output_dir={out}", f"run_name={name}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    log_path = out / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if poll is not None:
                poll(proc.pid)
            time.sleep(0.5)
    if proc.returncode:
        raise SystemExit(f"bench side '{name}' failed (exit {proc.returncode}); see {log_path}")
    metrics = out / name / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    shutil.rmtree(out / name)
    return [r for r in rows if r["stage"] == "train"]
