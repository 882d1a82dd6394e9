"""A Hugging Face ``config.json`` for an ArchSpec (what vLLM and ``transformers`` need to load our weights)."""
from __future__ import annotations

from typing import Any, Optional

from megatron_meml.model.arch import ArchSpec

_CLASSES = {"qwen2": ("Qwen2ForCausalLM", "qwen2"), "llama": ("LlamaForCausalLM", "llama")}


def hf_config_dict(arch: ArchSpec, *, dtype: str = "float32", bos: Optional[int] = None,
                   eos: Optional[int] = None, pad: Optional[int] = None) -> dict[str, Any]:
    cls, model_type = _CLASSES[arch.family]
    cfg: dict[str, Any] = {
        "architectures": [cls], "model_type": model_type, "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size, "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_kv_heads, "head_dim": arch.head_dim,
        "max_position_embeddings": arch.max_position_embeddings, "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.rms_norm_eps, "tie_word_embeddings": arch.tie_embeddings, "hidden_act": "silu",
        "torch_dtype": dtype, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "attention_dropout": 0.0, "use_cache": True,
    }
    if arch.family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers)
    else:
        cfg.update(attention_bias=arch.qkv_bias, mlp_bias=False)
    if arch.rope_scaling is not None:
        s = arch.rope_scaling
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings}
    return cfg
