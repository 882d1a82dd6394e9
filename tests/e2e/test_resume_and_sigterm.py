"""RIEL resume and preemption, end to end through the `meml` command (real Megatron-Core, real vLLM on CPU).

* An interrupted run resumed from its last checkpoint logs the same per-step metrics as an uninterrupted one
  (bit-exact on CPU: same weights, optimizer state, sampler position, hard store and per-step engine seed), also
  with dynamic sampling, whose refills move the sampler further.
* SIGTERM (what SLURM sends before preemption) makes the run checkpoint at the end of its step and exit 0.
* The same holds for asynchronous rollouts (rollout.max_staleness=1) preempted by SIGTERM: the batch generated
  ahead is checkpointed and trained on after the resume.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "embedded-default.yaml"
SMALL = ["model.num_layers=2", "model.max_position_embeddings=96", "data.synthetic_levels=[1]",
         "data.synthetic_weights=[1.0]", "data.synthetic_size=64", "rollout.samples_per_expert=4",
         "rollout.max_new_tokens=24", "train.problems_per_step=2", "train.micro_batch_size=16",
         "hard_examples.capacity=4", "hard_examples.k_wrong=2", "algo.policy_loss=clipped", "algo.advantage=drgrpo", "eval.max_problems=0",
         "train.threads=1", "logging.tensorboard=false", "logging.progress=line",
         # this untrained toy scores nothing, so every advantage is 0: train the GRPO rows anyway (their loss is 0,
         # but their engine log-probs and forward pass are what the resume must reproduce)
         "algo.skip_zero_advantage=false"]
COMPARED = ("reward/mean", "train/loss", "train/pg_loss", "train/sft_nll", "train/mismatch_abs", "hard/size",
            "rollout/tokens", "train/grad_norm")


def _meml(*args: str, out: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_meml.cli", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def _train_metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r["stage"] == "train"}


@pytest.mark.parametrize("extra", [[], ["algo.dynamic_sampling=true", "algo.dynamic_sampling_max_gen_batches=3"]],
                         ids=["plain", "dynamic-sampling"])
def test_resumed_run_matches_uninterrupted(tmp_path, extra):
    common = ["train", str(RECIPE), *SMALL, *extra, f"output_dir={tmp_path}", "checkpoint.save_every=2"]
    full = _meml(*common, "run_name=full", "train.steps=4", out=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    part = _meml(*common, "run_name=resumed", "train.steps=2", out=tmp_path)
    assert part.returncode == 0, part.stderr[-3000:]
    rest = _meml(*common, "run_name=resumed", "train.steps=4", out=tmp_path)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "[resume] from" in rest.stdout + rest.stderr
    a, b = _train_metrics(tmp_path / "full"), _train_metrics(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in COMPARED:
            if key in a[step] or key in b[step]:
                assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))
    assert any(a[s].get("train/sft_nll", 0) > 0 for s in (3, 4)), "no hard-example SFT ran: the check is vacuous"
    if not extra:  # GRPO rows with engine log-probs were trained
        assert all(a[s]["train/mismatch_abs"] > 0 for s in (3, 4))
    else:  # refills drew further problems after the resume point: the sampler position was restored exactly
        # (this untrained toy scores nothing, so every question is filtered and each step draws all its batches)
        assert any(a[s]["rollout/gen_batches"] > 1 for s in (3, 4)), "no refill after the resume: vacuous"
        for step in (3, 4):
            for key in ("rollout/gen_batches", "rollout/filtered_groups", "rollout/informative_questions"):
                assert a[step][key] == b[step][key], (step, key)


def _preempt_after_first_step(cmd: list[str]) -> str:
    """Run ``cmd``, send SIGTERM once its first step is logged, return its output (asserting a clean exit 0)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # wait for the first finished step
        seen.append(line)
        if line.startswith("[train] step"):
            break
        assert time.monotonic() < deadline, "no training step within 600 s"
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(seen)[-2000:] + rest[-3000:]
    return "".join(seen) + rest


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "megatron_meml.cli", "train", str(RECIPE), *SMALL, f"output_dir={tmp_path}",
           "run_name=preempted", "train.steps=200", "checkpoint.save_every=0"]
    _preempt_after_first_step(cmd)
    ckpt_root = tmp_path / "preempted" / "checkpoints"
    latest = (ckpt_root / "latest").read_text().strip()
    state = json.loads((ckpt_root / latest / "run_state.json").read_text())
    assert 1 <= state["step"] < 200 and state["with_optimizer"]
    assert not list(ckpt_root.glob("*.partial"))


def test_asynchronous_run_preempted_and_resumed_matches_uninterrupted(tmp_path):
    """rollout.max_staleness=1: the batch generated ahead at preemption time is in the checkpoint, and the resumed
    run trains on it, so every later step matches the uninterrupted run."""
    common = ["train", str(RECIPE), *SMALL, f"output_dir={tmp_path}", "rollout.max_staleness=1", "train.steps=4",
              "checkpoint.save_every=0", "logging.samples_per_step=1000"]  # every completion, with its problem id
    full = _meml(*common, "run_name=full", out=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    a = _train_metrics(tmp_path / "full")
    assert sorted(a) == [1, 2, 3, 4]
    assert a[1]["rollout/staleness"] == 0 and all(a[s]["rollout/staleness"] == 1 for s in (2, 3, 4))
    assert all(a[s]["rollout/overlap_seconds"] >= 0 for s in (2, 3))
    assert all("train/mismatch_abs_staleness1" in a[s] for s in (2, 3, 4))  # the last step too: its batch is stale
    assert "rollout/overlap_seconds" not in a[4]  # the last step generates nothing ahead

    _preempt_after_first_step([sys.executable, "-m", "megatron_meml.cli", *common, "run_name=resumed"])
    ckpt_root = tmp_path / "resumed" / "checkpoints"
    latest = ckpt_root / (ckpt_root / "latest").read_text().strip()
    stopped = json.loads((latest / "run_state.json").read_text())["step"]
    assert 1 <= stopped < 4
    ahead = json.loads((latest / "rollouts_ahead" / "rank00000.json").read_text())
    assert [row["step"] for row in ahead] == [stopped + 1]
    rest = _meml(*common, "run_name=resumed", out=tmp_path)
    assert rest.returncode == 0, rest.stderr[-3000:]
    b = _train_metrics(tmp_path / "resumed")
    assert sorted(b) == [1, 2, 3, 4]
    for step in range(stopped + 1, 5):
        for key in COMPARED + ("rollout/staleness",):
            if key in a[step] or key in b[step]:
                assert a[step].get(key) == b[step].get(key), (step, key, a[step].get(key), b[step].get(key))
    # no prompt lost or repeated: the same problems at every step, and no problem at two steps
    ids_a, ids_b = _trained_problems(tmp_path / "full"), _trained_problems(tmp_path / "resumed")
    assert ids_a == ids_b and sorted(ids_a) == [1, 2, 3, 4]
    every = [p for step in ids_a.values() for p in step]
    assert len(every) == len(set(every)) == 4 * 2  # train.problems_per_step=2


def _trained_problems(run_dir: Path) -> dict[int, set]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    out: dict[int, set] = {}
    for r in rows:
        if r["stage"] == "train":
            out.setdefault(r["step"], set()).add(r["problem_id"])
    return out
