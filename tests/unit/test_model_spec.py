"""Layer-spec selection and model-config errors (TE branch skips where Transformer Engine is absent)."""
from __future__ import annotations

import functools

import pytest

from megatron_meml.config import ConfigError, load_config
from megatron_meml.model.arch import ArchSpec, UnsupportedArchitecture, arch_from_hf_config, rope_inv_freq
from megatron_meml.model.config import ModelConfig
from megatron_meml.model.provider import ModelConfigError, layer_spec, resolve_layer_spec, te_available


def test_auto_spec_follows_transformer_engine():
    assert resolve_layer_spec(ModelConfig(), have_te=False) == "sdpa"
    assert resolve_layer_spec(ModelConfig(), have_te=True) == "te"
    assert resolve_layer_spec(ModelConfig(layer_spec="local"), have_te=True) == "local"
    assert resolve_layer_spec(ModelConfig(layer_spec="sdpa"), have_te=True) == "sdpa"
    assert resolve_layer_spec(ModelConfig(layer_spec="sdpa"), have_te=False) == "sdpa"


def test_fp8_without_te_is_a_clear_error():
    with pytest.raises(ModelConfigError, match=r"model.fp8=e4m3 needs Transformer Engine.*model.fp8=null"):
        resolve_layer_spec(ModelConfig(fp8="e4m3"), have_te=False)
    with pytest.raises(ModelConfigError, match="model.layer_spec=te needs Transformer Engine"):
        resolve_layer_spec(ModelConfig(layer_spec="te"), have_te=False)
    with pytest.raises(ModelConfigError, match="needs the Transformer Engine layer spec"):
        resolve_layer_spec(ModelConfig(fp8="hybrid", layer_spec="local"), have_te=True)
    with pytest.raises(ModelConfigError, match="needs the Transformer Engine layer spec, not 'sdpa'"):
        resolve_layer_spec(ModelConfig(fp8="hybrid", layer_spec="sdpa"), have_te=True)


def test_fp8_config_values_checked():
    with pytest.raises(ConfigError, match="model.fp8 must be null or one of"):
        load_config(None, ["model.fp8=e5m2"])
    with pytest.raises(ConfigError, match="model.fp8_recipe must be one of"):
        load_config(None, ["model.fp8_recipe=weird"])


@pytest.mark.skipif(not te_available(), reason="Transformer Engine is not installed on this machine; "
                                                "the TE spec is exercised in the NGC container / GPU runs")
def test_te_spec_builds_with_fp8_settings():
    from megatron_meml.model.provider import transformer_config
    from megatron_meml.parallel import ParallelConfig

    cfg = ModelConfig(layer_spec="te", fp8="hybrid", fp8_recipe="delayed")
    assert resolve_layer_spec(cfg) == "te"
    spec = layer_spec("te")
    assert "TE" in repr(spec) or "transformer_engine" in repr(spec)
    tcfg = transformer_config(_arch(), cfg, ParallelConfig())
    assert tcfg.fp8 == "hybrid" and tcfg.fp8_recipe == "delayed"


def test_local_spec_builds():
    spec = layer_spec("local")
    assert "DotProductAttention" in repr(spec)


def test_sdpa_spec_is_the_local_spec_with_sdpa_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_meml.model.sdpa_attention import SDPAttention

    local, sdpa = layer_spec("local"), layer_spec("sdpa")
    attn_l, attn_s = local.submodules.self_attention, sdpa.submodules.self_attention
    assert attn_l.submodules.core_attention is DotProductAttention  # the local spec is left untouched
    assert attn_s.submodules.core_attention is SDPAttention
    assert attn_s.params == attn_l.params and attn_s.module is attn_l.module
    for name in ("linear_qkv", "linear_proj", "q_layernorm", "k_layernorm"):
        assert getattr(attn_s.submodules, name) is getattr(attn_l.submodules, name)
    for name in ("input_layernorm", "pre_mlp_layernorm", "mlp", "self_attn_bda", "mlp_bda",
                 "sharded_state_dict_keys_map"):
        assert _same_spec(getattr(sdpa.submodules, name), getattr(local.submodules, name)), name


def _same_spec(a, b) -> bool:
    """Equal specs. megatron-core 0.19's MLP entry is a ``functools.partial`` (``MLP.as_mlp_submodule`` with its
    submodules), and two partials built alike compare unequal: compare what they call, and with what."""
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return a.func == b.func and a.args == b.args and a.keywords == b.keywords
    return a == b


def test_unknown_spec_name_lists_choices():
    with pytest.raises(ModelConfigError, match="choose auto, te, local or sdpa"):
        layer_spec("flash")


def test_fusions_only_on_cuda_and_when_enabled():
    from megatron_meml.model.provider import fusion_flags

    assert not any(fusion_flags(ModelConfig(), cuda=False).values())
    assert not any(fusion_flags(ModelConfig(fused_kernels=False), cuda=True).values())
    on = fusion_flags(ModelConfig(), cuda=True)
    # The pure-PyTorch fusions need no extension; the others follow what imports here.
    assert on["bias_activation_fusion"] and on["bias_dropout_fusion"] and on["cross_entropy_loss_fusion"]
    assert on["apply_rope_fusion"] == te_available()


def _arch(**kw):
    base = dict(family="qwen2", vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=4,
                num_kv_heads=2, head_dim=16, ffn_hidden_size=128, max_position_embeddings=64, rope_theta=1e4,
                rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True)
    return ArchSpec(**{**base, **kw})


def test_tp_pp_divisibility_errors_name_the_quantity():
    with pytest.raises(ValueError, match="does not divide num_kv_heads = 2"):
        _arch().check_tp(4)
    with pytest.raises(ValueError, match="does not divide num_layers = 2"):
        _arch().check_pp(4)


QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
         "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192,
         "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": True, "head_dim": 64,
         "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def test_arch_from_hf_configs():
    q = arch_from_hf_config(QWEN)
    assert (q.family, q.head_dim, q.qkv_bias, q.tie_embeddings, q.rope_scaling) == ("qwen2", 128, True, True, None)
    ll = arch_from_hf_config(LLAMA)
    assert ll.family == "llama" and not ll.qkv_bias and ll.rope_scaling.factor == 32.0


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitecture, match=r"'MistralForCausalLM' is not supported; supported: "
                                                      r"LlamaForCausalLM, Qwen2ForCausalLM"):
        arch_from_hf_config({**LLAMA, "architectures": ["MistralForCausalLM"]})
    with pytest.raises(UnsupportedArchitecture):  # no substring matching: a lookalike name is refused
        arch_from_hf_config({**LLAMA, "architectures": ["LlamaForCausalLMX"]})


def test_rope_inv_freq_matches_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(**{k: v for k, v in LLAMA.items() if k not in ("architectures", "model_type")})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(arch_from_hf_config(LLAMA)), want, atol=0, rtol=0)
