"""``verify``: logits of the HF model vs. the real Megatron model loaded from the converted checkpoint, at
TP=1, TP=2, PP=2 (and TP=2 x PP=2 through the CLI), fp32 tolerance 1e-5 on these O(1) logits; and a checkpoint
written by Megatron itself (TP=2 x PP=2) converted to HF matches too. verify's own rule (relative to the logit
scale): real-scale logits pass at TP=2, a wrong mapping table fails. Ranks are spawned by ``verify`` (gloo, CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints_convert.__main__ import main
from checkpoints_convert.convert import hf_to_megatron_dir, megatron_to_hf_dir
from checkpoints_convert.mappings import TABLES
from checkpoints_convert.verify import VerifyConfig, verify
from tests.dist import run_distributed
from tests.unit.test_convert_roundtrip import WORDS, tiny_hf_model
from tests.unit.test_convert_verify import WRONG, real_scale, wrong_table

pytestmark = pytest.mark.distributed
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("convert_parity")
    out = {}
    for kind in ("qwen2", "llama"):
        hf = tiny_hf_model(kind, root / f"{kind}_hf")
        hf_to_megatron_dir(hf, root / f"{kind}_meg", tp=2, pp=2)
        out[kind] = (hf, root / f"{kind}_meg")
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_fp32_logits_match(models, kind, tp, pp):
    hf, meg = models[kind]
    r = verify(VerifyConfig(hf=str(hf), megatron=str(meg), tp=tp, pp=pp))
    assert r.tokens == 4 * 32
    assert r.max_abs_diff <= TOL and r.greedy_agreement == 1.0 and abs(r.mean_kl) < 1e-9, r


def test_cli_with_prompts_at_tp2_pp2(models, tmp_path, capsys):
    hf, meg = models["llama"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(" ".join(WORDS) + "\n\nwhat does two plus three equal\n")
    code = main(["verify", "--hf", str(hf), "--megatron", str(meg), "--tp", "2", "--pp", "2",
                 "--prompts", str(prompts)])
    out = capsys.readouterr().out
    assert code == 0 and "tp=2 pp=2: 20 tokens" in out and "PASS" in out


def test_wrong_weights_fail_with_exit_code_1(models, tmp_path, capsys):
    other = tiny_hf_model("qwen2", tmp_path / "other", seed=1)
    code = main(["verify", "--hf", str(other), "--megatron", str(models["qwen2"][1])])
    assert code == 1 and "FAIL" in capsys.readouterr().out


def test_real_scale_logits_pass_at_tp2(tmp_path):
    """Logits ~8x larger (max ~27, as a real model's): TP=2 reduction-order noise grows with them, and the rule
    (max |diff| <= 1e-4 x max |logit|) still passes."""
    hf = real_scale(tiny_hf_model("qwen2", tmp_path / "hf"), 8.0)
    hf_to_megatron_dir(hf, tmp_path / "meg", tp=2)
    r = verify(VerifyConfig(hf=str(hf), megatron=str(tmp_path / "meg"), tp=2))
    print(f"real-scale tiny qwen2 tp=2: max |diff| {r.max_abs_diff:.2e} = {r.relative_diff:.1e} x {r.logit_scale:.1f}")
    assert r.logit_scale > 20 and r.max_abs_diff > 0 and r.passed and r.greedy_agreement == 1.0, r


def test_wrong_mapping_table_fails_at_tp2(tmp_path, monkeypatch, capsys):
    """A checkpoint written through a table with gate/up swapped: verify (ranks use the real table) says FAIL."""
    hf = real_scale(tiny_hf_model("llama", tmp_path / "hf", layers=2), 8.0)
    with monkeypatch.context() as m:
        m.setitem(TABLES, "llama", wrong_table("llama", *WRONG["gate_up_swapped"]))
        hf_to_megatron_dir(hf, tmp_path / "meg", tp=2)
    code = main(["verify", "--hf", str(hf), "--megatron", str(tmp_path / "meg"), "--tp", "2"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out, out


def _save_megatron_model(rank, world, hf_dir, ckpt):
    import os

    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_meml.model.arch import arch_from_hf_config, load_hf_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.model.provider import build_model
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.distributed import init_distributed
    import torch

    par = ParallelConfig(tp=2, pp=2)
    init_distributed(par)
    torch.manual_seed(3)
    model_parallel_cuda_manual_seed(3)
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    model = build_model(arch, ModelConfig(hf_path=hf_dir, layer_spec="local", dtype="fp32"), par)
    with torch.no_grad():  # Megatron's init leaves norms at 1 and biases at 0: make every tensor informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    os.makedirs(ckpt, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)


def test_checkpoint_written_by_megatron_converts_to_hf(models, tmp_path):
    hf, _ = models["qwen2"]
    ckpt = tmp_path / "megatron_native"
    run_distributed(_save_megatron_model, 4, str(hf), str(ckpt), megatron=True)
    megatron_to_hf_dir(ckpt, tmp_path / "hf_out", config=hf)
    r = verify(VerifyConfig(hf=str(tmp_path / "hf_out"), megatron=str(ckpt), tp=1, pp=1))
    assert r.max_abs_diff <= TOL and r.greedy_agreement == 1.0, r
