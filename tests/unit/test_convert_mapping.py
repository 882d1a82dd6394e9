"""Mapping tables and TP/PP helpers against hand-worked layouts (no files, no processes)."""
from __future__ import annotations

import pytest
import torch

from checkpoints_convert import (ConvertError, expected_shape, gather_from_tp, hf_to_megatron, megatron_names,
                                 megatron_to_hf, shard_for_tp, to_global_name, to_local_name)
from checkpoints_convert.mapping import ckpt_key, tp_regions
from megatron_meml.model.arch import ArchSpec, UnsupportedArchitecture


def arch(**kw) -> ArchSpec:
    base = dict(family="qwen2", vocab_size=8, hidden_size=2, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                head_dim=1, ffn_hidden_size=4, max_position_embeddings=16, rope_theta=1e4, rms_norm_eps=1e-6,
                tie_embeddings=True, qkv_bias=True)
    return ArchSpec(**{**base, **kw})


def test_qkv_is_interleaved_per_query_group():
    a = arch()  # 4 query heads in 2 groups, head_dim 1: rows q0..q3, k0..k1, v0..v1
    hf = {"model.layers.1.self_attn.q_proj.bias": torch.tensor([10., 11., 12., 13.]),
          "model.layers.1.self_attn.k_proj.bias": torch.tensor([20., 21.]),
          "model.layers.1.self_attn.v_proj.bias": torch.tensor([30., 31.])}
    fused = hf_to_megatron(a, "decoder.layers.1.self_attention.linear_qkv.bias", hf.__getitem__)
    assert fused.tolist() == [10., 11., 20., 30., 12., 13., 21., 31.]  # [q of group 0, k0, v0, q of group 1, k1, v1]
    back = dict(megatron_to_hf(a, "decoder.layers.1.self_attention.linear_qkv.bias", fused))
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_fc1_is_gate_then_up_and_tp_shards_hold_both_halves():
    a = arch()
    gate, up = torch.arange(8.).reshape(4, 2), 100 + torch.arange(8.).reshape(4, 2)
    hf = {"model.layers.0.mlp.gate_proj.weight": gate, "model.layers.0.mlp.up_proj.weight": up}
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    full = hf_to_megatron(a, name, hf.__getitem__)
    assert torch.equal(full, torch.cat([gate, up]))
    r0, r1 = shard_for_tp(name, full, 2, 0), shard_for_tp(name, full, 2, 1)
    assert torch.equal(r0, torch.cat([gate[:2], up[:2]])) and torch.equal(r1, torch.cat([gate[2:], up[2:]]))
    assert torch.equal(gather_from_tp(name, [r0, r1]), full)


@pytest.mark.parametrize("name,dim", [("decoder.layers.2.self_attention.linear_proj.weight", 1),
                                      ("decoder.layers.2.mlp.linear_fc2.weight", 1),
                                      ("decoder.layers.2.self_attention.linear_qkv.weight", 0),
                                      ("embedding.word_embeddings.weight", 0), ("output_layer.weight", 0)])
def test_plain_tp_split_dims(name, dim):
    full = torch.arange(64.).reshape(8, 8)
    shards = [shard_for_tp(name, full, 4, r) for r in range(4)]
    assert all(torch.equal(s, c) for s, c in zip(shards, full.chunk(4, dim)))
    assert torch.equal(gather_from_tp(name, shards), full)


def test_norms_are_replicated_under_tp():
    full = torch.arange(4.)
    assert shard_for_tp("decoder.layers.0.input_layernorm.weight", full, 2, 1) is full


@pytest.mark.parametrize("name", ["decoder.layers.0.mlp.linear_fc1.weight",
                                  "decoder.layers.0.self_attention.linear_proj.weight"])
def test_tp_regions_are_what_each_rank_holds(name):
    full = torch.arange(96.).reshape(8, 12)
    regions = tp_regions(name, tuple(full.shape), 2)
    per_rank = len(regions) // 2
    dim = 1 if "linear_proj" in name else 0
    for r in range(2):
        pieces = [full[tuple(slice(o, o + s) for o, s in zip(off, size))]
                  for off, size in regions[r * per_rank:(r + 1) * per_rank]]
        assert torch.equal(torch.cat(pieces, dim), shard_for_tp(name, full, 2, r))


def test_every_tensor_round_trips_for_both_families():
    for a in (arch(), arch(family="llama", tie_embeddings=False, qkv_bias=False)):
        g = torch.Generator().manual_seed(0)
        hf = {}
        for name in megatron_names(a):  # HF tensors of the right shapes, then HF -> Megatron -> HF
            full = torch.randn(expected_shape(a, name), generator=g)
            hf.update(megatron_to_hf(a, name, full))
        back = {}
        for name in megatron_names(a):
            back.update(megatron_to_hf(a, name, hf_to_megatron(a, name, hf.__getitem__)))
        assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
        want = 2 + a.num_layers * (12 if a.qkv_bias else 9) + (0 if a.tie_embeddings else 1)
        assert len(hf) == want


def test_tied_output_layer_maps_to_the_embedding():
    a = arch()
    emb = torch.randn(8, 2)
    assert megatron_to_hf(a, "output_layer.weight", emb) == []
    assert "output_layer.weight" not in list(megatron_names(a))
    assert hf_to_megatron(a, "output_layer.weight", {"model.embed_tokens.weight": emb}.__getitem__) is emb
    untied = arch(tie_embeddings=False)
    assert [n for n, _ in megatron_to_hf(untied, "output_layer.weight", emb)] == ["lm_head.weight"]


def test_te_spec_names_and_checkpoint_keys():
    a = arch()
    t = torch.ones(2)
    assert megatron_to_hf(a, "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", t)[0][0] == \
        "model.layers.3.input_layernorm.weight"
    assert ckpt_key("decoder.layers.3.pre_mlp_layernorm.weight") == ("decoder.layers.mlp.linear_fc1.layer_norm_weight", 3)
    assert ckpt_key("decoder.final_layernorm.weight") == ("decoder.final_layernorm.weight", None)


def test_pipeline_layer_indices():
    assert to_global_name("decoder.layers.1.mlp.linear_fc2.weight", 8, 4, 2) == "decoder.layers.5.mlp.linear_fc2.weight"
    assert to_local_name("decoder.layers.5.mlp.linear_fc2.weight", 8, 4) == (2, "decoder.layers.1.mlp.linear_fc2.weight")
    assert to_local_name("output_layer.weight", 8, 4) == (3, "output_layer.weight")
    assert to_local_name("embedding.word_embeddings.weight", 8, 4)[0] == 0


def test_errors_name_the_problem():
    a = arch()
    with pytest.raises(ConvertError, match=r"model.layers.0.mlp.down_proj.weight.*\(3, 4\).*\(2, 4\)"):
        hf_to_megatron(a, "decoder.layers.0.mlp.linear_fc2.weight", lambda n: torch.zeros(3, 4))
    with pytest.raises(ConvertError, match=r"linear_fc2.weight.*\(2, 5\).*\(2, 4\)"):
        megatron_to_hf(a, "decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(2, 5))
    with pytest.raises(ConvertError, match="layer 9 out of range"):
        megatron_to_hf(a, "decoder.layers.9.mlp.linear_fc2.weight", torch.zeros(2, 4))
    with pytest.raises(ConvertError, match="no mapping"):
        megatron_to_hf(a, "decoder.layers.0.mlp.router.weight", torch.zeros(2, 4))
    with pytest.raises(UnsupportedArchitecture, match="supported: llama, qwen2"):
        megatron_to_hf(arch(family="mistral"), "decoder.final_layernorm.weight", torch.zeros(2))
