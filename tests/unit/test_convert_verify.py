"""verify's figures against hand-worked numbers, its pass rule, a wrong mapping table judged by that rule, and the
small pieces around it (no Megatron processes)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_convert import ConvertError
from checkpoints_convert.convert import load_arch
from checkpoints_convert.hf_io import HFReader
from checkpoints_convert.launch import run_ranks
from checkpoints_convert.mapping import Table
from checkpoints_convert.mappings import TABLES, hf_to_megatron, megatron_names, megatron_to_hf
from checkpoints_convert.verify import Limits, VerifyConfig, compare, token_ids
from tests.unit.test_convert_roundtrip import tiny_hf_model

FP32 = VerifyConfig(hf="a", megatron="b").limits


def test_compare_hand_worked():
    hf = [torch.tensor([[0.0, 0.0, -40.0], [2.0, 0.0, 0.0]])]
    meg = [torch.tensor([[math.log(3.0), 0.0, -40.0], [2.0, 0.0, 2.2]])]
    r = compare(hf, meg, Limits(rtol=0.06, kl=1.0))
    # row 0: p = (1/2, 1/2, e^-40 ~ 0), q = (3/4, 1/4, 0): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); row 1: softmax
    p = torch.tensor([2.0, 0.0, 0.0]).softmax(0)
    q = torch.tensor([2.0, 0.0, 2.2]).softmax(0)
    kl1 = (p * (p.log() - q.log())).sum().item()
    assert r.mean_kl == pytest.approx((0.5 * math.log(4 / 3) + kl1) / 2, rel=1e-6)
    assert r.max_abs_diff == pytest.approx(2.2) and r.logit_scale == 40.0
    assert r.relative_diff == pytest.approx(2.2 / 40) and r.bound == pytest.approx(0.06 * 40)
    assert r.greedy_agreement == 0.5  # row 0: both pick token 0; row 1: token 0 vs token 2
    assert r.tokens == 2 and r.passed  # 2.2 <= 2.4 and KL 0.27 <= 1
    lines = r.lines(VerifyConfig(hf="a", megatron="b"))
    assert lines[1] == "  max |logit diff|      2.200e+00 = 5.5e-02 x max |logit|  (allowed: rtol 0.06 x max |logit| " \
                       "40.0 = 2.4e+00)"
    assert lines[2].endswith("(allowed 1)") and lines[-1] == "  PASS"
    assert not compare(hf, meg, Limits(rtol=0.05, kl=1.0)).passed  # 2.2 > 2.0
    assert not compare(hf, meg, Limits(rtol=0.06, kl=0.2)).passed  # KL 0.27 > 0.2
    assert not compare(hf, meg, Limits(rtol=0.06, atol=2.0, kl=1.0)).passed  # absolute bound replaces rtol x 40


def test_fp32_rule_is_relative_to_the_logit_scale():
    """The TP=3 figure of the real model (1.4e-4 on logits of ~34) passes; the same diff on O(1) logits fails."""
    assert (FP32.rtol, FP32.atol, FP32.kl) == (1e-4, None, 1e-6)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 500, generator=g, dtype=torch.float64)
    noise = torch.full_like(base, 1.4e-4) * torch.randn(64, 500, generator=g).sign()
    big = base / base.abs().max() * 34.0
    r = compare([big], [big + noise], FP32)
    assert r.max_abs_diff == pytest.approx(1.4e-4) and r.passed, r
    small = base / base.abs().max()
    assert not compare([small], [small + noise], FP32).passed


def test_kl_is_checked_beside_the_max_diff():
    """Two tokens at a tie, shifted by +-d: max diff d is inside the bound, KL = ln cosh d ~ d^2 / 2 is not."""
    d = 1.9e-3
    hf = [torch.tensor([[20.0, 20.0]], dtype=torch.float64)]
    meg = [torch.tensor([[20.0 + d, 20.0 - d]], dtype=torch.float64)]
    r = compare(hf, meg, FP32)
    assert r.max_abs_diff <= r.bound == pytest.approx(2e-3)
    assert r.mean_kl == pytest.approx(math.log(math.cosh(d)), rel=1e-6) and not r.passed


def real_scale(hf: Path, factor: float) -> Path:
    """Multiply the final norm weight by ``factor``: every logit grows by ``factor`` (real models reach ~30)."""
    weights = load_file(str(hf / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * factor
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return hf


def wrong_table(family: str, megatron: str, hf: tuple[str, ...]) -> Table:
    """The family's table with one layer rule's HF names replaced (a wrong mapping of the same shapes)."""
    table = TABLES[family]
    rules = tuple(dataclasses.replace(r, hf=hf) if r.megatron == megatron else r for r in table.layer_rules)
    assert rules != table.layer_rules
    return dataclasses.replace(table, layer_rules=rules)


WRONG = {"gate_up_swapped": ("mlp.linear_fc1.weight", ("mlp.up_proj.weight", "mlp.gate_proj.weight")),
         "k_v_swapped": ("self_attention.linear_qkv.weight",
                         ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.weight"))}


def _through_tables(src: Path, monkeypatch, wrong: Table | None) -> dict[str, torch.Tensor]:
    """HF -> full Megatron tensors (with ``wrong`` table if given) -> HF with the real table."""
    _, arch = load_arch(src)
    reader = HFReader(src)
    with monkeypatch.context() as m:
        if wrong is not None:
            m.setitem(TABLES, arch.family, wrong)
        full = {name: hf_to_megatron(arch, name, reader.get) for name in megatron_names(arch)}
    return {hf: t for name, x in full.items() for hf, t in megatron_to_hf(arch, name, x)}


@pytest.mark.parametrize("kind", sorted(WRONG))
def test_a_wrong_mapping_fails_by_a_wide_margin(tmp_path, monkeypatch, kind):
    """Logits of a real-scale model (max |logit| ~ 20) whose weights went through a wrong table: FAIL, with a
    relative diff >= 100 x rtol; through the right table: identical logits."""
    from transformers import AutoModelForCausalLM

    src = real_scale(tiny_hf_model("llama", tmp_path / "hf", layers=2), 8.0)
    model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = token_ids(VerifyConfig(hf=str(src), megatron=str(src)), 128)
    with torch.no_grad():
        ref = [model(x).logits[0] for x in ids]
        results = {}
        for name, table in (("right", None), (kind, wrong_table("llama", *WRONG[kind]))):
            model.load_state_dict(_through_tables(src, monkeypatch, table))
            results[name] = compare(ref, [model(x).logits[0] for x in ids], FP32)
    assert results["right"].max_abs_diff == 0.0 and results["right"].passed
    r = results[kind]
    assert r.logit_scale > 10 and r.relative_diff > 100 * FP32.rtol and not r.passed, r


def test_random_ids_are_seeded_and_prompts_need_a_file(tmp_path):
    cfg = VerifyConfig(hf=str(tmp_path), megatron=str(tmp_path), seq_len=5, num_random=2)
    a, b = token_ids(cfg, 50), token_ids(cfg, 50)
    assert [x.shape for x in a] == [(1, 5), (1, 5)] and all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ConvertError, match="does not exist"):
        token_ids(VerifyConfig(hf=str(tmp_path), megatron=str(tmp_path), prompts=str(tmp_path / "no.txt")), 50)
    with pytest.raises(ValueError, match="dtype"):
        VerifyConfig(hf="a", megatron="b", dtype="fp8")


def _fails_on_rank_1(x):
    import os

    if os.environ["RANK"] == "1":
        raise ConvertError(f"bad thing {x}")
    return int(os.environ["RANK"]) + x


def test_run_ranks_reports_a_failing_rank():
    assert run_ranks(_fails_on_rank_1, 1, 10) == [10]
    with pytest.raises(ConvertError, match="rank 1: bad thing 3"):
        run_ranks(_fails_on_rank_1, 2, 3)
