"""The paper's GSM8K recipe, same code path, on CPU: a tiny random Qwen2 (built here, char tokenizer) on the real
GSM8K training file, 2 RIEL steps through `meml train`, asserting metric invariants."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.invariants import check_step, train_rows

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
RECIPE = ROOT / "recipes" / "meml-qwen2.5-math-1.5b-1n8g-tp1pp1dp8-gsm8k.yaml"
N_PROBLEMS = 48
N_EVAL = 4
EXPERTS = ("expert0", "expert1", "expert2")


def _tiny_hf_model(path: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_meml.data.charset import char_tokenizer
    from megatron_meml.experts.expert_set import load_experts, vocab_texts
    from megatron_meml.experts.config import ExpertsConfig

    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:N_PROBLEMS]]
    ecfg = ExpertsConfig(ids=["expert0", "expert1", "expert2"])
    texts = [r["question"] + r["answer"] for r in rows] + vocab_texts(load_experts(ecfg, 3), ecfg)
    tok = char_tokenizer(texts)
    assert len(tok) <= 128, len(tok)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1536,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, torch_dtype="float32", use_sliding_window=False)
    Qwen2ForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"GSM8K copy not found at {GSM8K}")
def test_gsm8k_recipe_two_steps(tmp_path):
    model_dir = tmp_path / "tiny-qwen2"
    _tiny_hf_model(model_dir)
    overrides = [f"output_dir={tmp_path}", "run_name=gsm8k", f"model.hf_path={model_dir}", "model.dtype=fp32",
                 f"data.path={GSM8K}", f"data.max_problems={N_PROBLEMS}", "train.steps=2",
                 "train.problems_per_step=2", "train.micro_batch_size=8", "train.threads=1",
                 "rollout.samples_per_expert=4", "rollout.max_new_tokens=16", "rollout.kv_cache_gb=0.25",
                 "hard_examples.k_wrong=2", "hard_examples.capacity=4", f"eval.max_problems={N_EVAL}",
                 "checkpoint.save_every=0", "logging.tensorboard=false", "algo.policy_loss=clipped",
                 # the random model scores nothing, so every advantage is 0: train the GRPO rows anyway, so that
                 # the engine/trainer log-prob mismatch below is measured
                 "algo.skip_zero_advantage=false"]
    proc = subprocess.run([sys.executable, "-m", "megatron_meml.cli", "train", str(RECIPE), *overrides], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "weights from hf:" in proc.stderr + proc.stdout  # the HF -> Megatron load path ran
    rows = [json.loads(x) for x in (tmp_path / "gsm8k" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = train_rows(tmp_path / "gsm8k", 2)
    for r in train:
        check_step(r, samples=2 * 3 * 4, experts=("expert0", "expert1", "expert2"), capacity=4)
        assert r["train/mismatch_abs"] < 1e-3, r["train/mismatch_abs"]  # vLLM vs Megatron, fp32
    assert train[-1]["hard/admissions_total"] > 0  # every random-model group is hard: the store was exercised
    assert (tmp_path / "gsm8k" / "final_model").is_dir()
    # the engine's start copy of the weights is scratch, gone with the engine; what `meml export` reads stays
    engine_dir = tmp_path / "gsm8k" / "rollout_model"
    assert (engine_dir / "config.json").is_file() and (engine_dir / "tokenizer_config.json").is_file()
    assert not list(engine_dir.glob("*.safetensors"))
    _check_what_the_model_wrote(tmp_path / "gsm8k", train, [r for r in rows if r["stage"] == "eval"])


def _check_what_the_model_wrote(run: Path, train: list[dict], evals: list[dict]) -> None:
    """Samples per RIEL step and per eval, the eval's per-problem file, the format/skill read-outs, the report."""
    for r in train:
        assert all(0.0 <= r[f"expert/{e}/format_rate"] <= 1.0 for e in EXPERTS)
    [ev] = evals
    assert ev["step"] == 2 and ev["eval/num_problems"] == N_EVAL
    for e in EXPERTS:
        for m in ("accuracy", "last_number_accuracy", "format_rate"):
            assert 0.0 <= ev[f"eval/gsm8k/{e}/{m}"] <= 1.0
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [(s["stage"], s["step"]) for s in samples] == [("train", 1)] * 4 + [("train", 2)] * 4 + [("eval", 2)] * 4
    fields = {"stage", "step", "expert", "problem_id", "prompt", "completion", "reward", "extracted", "gold",
              "finish_reason", "in_format", "sample_index", "prompt_tail"}
    for s in samples:
        assert set(s) == fields and s["finish_reason"] in ("stop", "length") and s["reward"] in (0.0, 1.0)
    for stage, step in (("train", 1), ("train", 2), ("eval", 2)):  # 4 picks spread over the 3 experts
        assert {s["expert"] for s in samples if (s["stage"], s["step"]) == (stage, step)} == set(EXPERTS)
    per_problem = [json.loads(x) for x in (run / "eval" / "step_2.jsonl").read_text().splitlines()]
    assert [p["index"] for p in per_problem] == list(range(N_EVAL))
    for p in per_problem:
        assert list(p["rewards"]) == list(p["extracted"]) == list(p["in_format"]) == list(EXPERTS)
    for e in EXPERTS:  # the file and the logged accuracy agree
        assert sum(p["rewards"][e] for p in per_problem) / N_EVAL == ev[f"eval/gsm8k/{e}/accuracy"]
        assert sum(p["in_format"][e] for p in per_problem) / N_EVAL == ev[f"eval/gsm8k/{e}/format_rate"]
    summary = (run / "report" / "summary.md").read_text()
    assert "## Expert complementarity (eval step 2, gsm8k, 4 problems)" in summary
    assert "### train: RIEL rollouts" in summary and "### eval: greedy evaluation answers" in summary
    assert "### last_number_accuracy" in summary and (run / "report" / "complementarity.png").is_file()
