"""`meml export` on a real run directory: a 2-step MEF SFT of the embedded default (2 layers), exported to a
Hugging Face directory that transformers and vLLM (CPU) load and generate from, whose logits equal the Megatron
model's, and, with --fp8, a modelopt FP8 checkpoint whose scales are the calibrated maxima (what CPU can check:
real FP8 GEMMs need a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_meml.cli import main as meml

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
E4M3_MAX = 448.0
VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True, seed=0,
          kv_cache_memory_bytes=64 << 20)
out = llm.generate({"prompt_token_ids": json.loads(sys.argv[2])}, SamplingParams(max_tokens=8, temperature=0.0))
print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cmd = [sys.executable, "-m", "megatron_meml.cli", "sft", str(ROOT / "recipes" / "embedded-default-mef.yaml"),
           f"output_dir={out}", "train.sft_steps=2", "eval.max_problems=0", "logging.tensorboard=false",
           "model.num_layers=2", "train.threads=1", "checkpoint.save_every=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "embedded-default-mef"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _calibration(run_dir: Path, n: int) -> list[list[int]]:
    from megatron_meml.config import load_config
    from megatron_meml.stages.export import calibration_sequences

    return calibration_sequences(load_config(run_dir / "config.sft.yaml"), n)


def test_export_loads_generates_and_matches_megatron(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checkpoints_convert.verify import VerifyConfig, verify

    out = tmp_path / "hf"
    assert meml(["export", str(run_dir), "--out", str(out)]) == 0
    assert not (run_dir / "rollout_model").exists()  # config.json and tokenizer were synthesised
    # logits of the exported model (transformers) against the Megatron model loaded from final_model
    report = verify(VerifyConfig(hf=str(out), megatron=str(run_dir / "final_model"), num_random=2, seq_len=24))
    assert report.max_abs_diff <= 1e-5, report
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id is not None and tok.eos_token_id == model.config.eos_token_id
    prompt = _calibration(run_dir, 1)[0][:20]
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    hf_tokens = gen[0, len(prompt):].tolist()
    assert len(hf_tokens) == 8 and isinstance(tok.decode(hf_tokens), str)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(out), json.dumps(prompt)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm_tokens = json.loads(proc.stdout.split("TOKENS", 1)[1])
    eos = tok.eos_token_id
    cut = hf_tokens.index(eos) + 1 if eos in hf_tokens else 8
    assert vllm_tokens[:cut] == hf_tokens[:cut]  # greedy, fp32: vLLM stops at EOS, transformers was held to 8


def test_export_step_checkpoint_and_user_errors(run_dir, tmp_path, capsys):
    final, step = tmp_path / "final", tmp_path / "step"
    assert meml(["export", str(run_dir), "--out", str(final)]) == 0
    assert meml(["export", str(run_dir), "--out", str(step), "--checkpoint", "latest"]) == 0
    a, b = _tensors(final), _tensors(step)  # both hold the weights after step 2 (b read past optimizer state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert meml(["export", str(run_dir), "--out", str(final)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert meml(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")]) == 2
    assert "nope' does not exist" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.sft.yaml").write_text((run_dir / "config.sft.yaml").read_text())
    assert meml(["export", str(unfinished), "--out", str(tmp_path / "o2")]) == 2
    assert "final_model' does not exist" in capsys.readouterr().err
    assert meml(["export", str(run_dir), "--out", str(tmp_path / "o3"), "--checkpoint", "step_9"]) == 2
    assert "step_9" in capsys.readouterr().err


def _input_maxima(model, sequences: list[list[int]]) -> dict[str, float]:
    """max |input| of every nn.Linear over the calibration sequences (the plain reference of max calibration)."""
    seen: dict[str, float] = {}

    def hook(name):
        def f(_m, args):
            seen[name] = max(seen.get(name, 0.0), args[0].abs().max().item())
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ids in sequences:
            model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return seen


def test_export_fp8_scales_are_calibrated_maxima(run_dir, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from megatron_meml.stages.export import fp8_fake_quantize, fp8_linears

    plain, fp8 = tmp_path / "plain", tmp_path / "fp8"
    assert meml(["export", str(run_dir), "--out", str(plain)]) == 0
    assert meml(["export", str(run_dir), "--out", str(fp8), "--fp8", "--calib-samples", "6"]) == 0
    qcfg = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "modelopt" and qcfg["quant_algo"] == "FP8"
    assert (fp8 / "tokenizer.json").is_file()
    w, q = _tensors(plain), _tensors(fp8)
    model = AutoModelForCausalLM.from_pretrained(str(plain)).eval()
    seqs = _calibration(run_dir, 6)
    maxima = _input_maxima(model, seqs)
    linears = [n for n in maxima if n != "lm_head"]
    assert len(linears) == 14 and q["lm_head.weight"].dtype == torch.float32  # 7 per layer; lm_head stays
    for name in linears:
        weight, scale = q[f"{name}.weight"], q[f"{name}.weight_scale"]
        assert weight.dtype == torch.float8_e4m3fn
        ref = w[f"{name}.weight"]
        torch.testing.assert_close(scale, ref.abs().max() / E4M3_MAX, rtol=1e-6, atol=0)
        err = (weight.float() * scale - ref).abs()  # E4M3: 3 mantissa bits; subnormal step 2^-9 x scale
        assert bool((err <= torch.clamp(ref.abs() * 2.0**-4, min=float(scale) * 2.0**-10) + 1e-12).all()), name
        torch.testing.assert_close(float(q[f"{name}.input_scale"]), maxima[name] / E4M3_MAX, rtol=1e-5, atol=0)
    # the fake-quantised forward (FP8 rounding simulated in fp32) stays close to the fp32 one, but is not it
    fq = fp8_fake_quantize(copy.deepcopy(model), seqs)
    assert len(list(fp8_linears(fq))) == 14
    ids = torch.tensor([seqs[0]])
    with torch.no_grad():
        ref_logits, fq_logits = model(ids).logits, fq(ids).logits
    rel = ((fq_logits - ref_logits).norm() / ref_logits.norm()).item()
    assert 0 < rel < 0.05, rel
