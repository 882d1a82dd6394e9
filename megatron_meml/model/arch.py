"""Architecture description shared by the model provider, checkpoint conversion and weight sync.

``ArchSpec`` is built either from a Hugging Face ``config.json`` (families chosen by an explicit registry key:
``architectures[0]``, else ``model_type``; never substring matching) or from the inline shape in ``ModelConfig``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_meml.errors import RunError, UserError
from megatron_meml.model.config import ModelConfig

# Registry: HF architecture class / model_type -> family key. Families are the keys of the conversion tables.
ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama"}


class UnsupportedArchitecture(UserError):
    """The HF config names an architecture this project has no mapping for."""


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.x ("llama3") rotary scaling parameters."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Everything about the network's shape that the Megatron model, conversion and vLLM need."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    rope_scaling: Optional[RopeScaling] = None

    def check_tp(self, tp: int) -> None:
        """Raise ValueError naming what TP size ``tp`` does not divide."""
        for what, n in (("num_attention_heads", self.num_attention_heads), ("num_kv_heads", self.num_kv_heads),
                        ("vocab_size", self.vocab_size), ("ffn_hidden_size", self.ffn_hidden_size)):
            if n % tp:
                raise ValueError(f"tensor-parallel size {tp} does not divide {what} = {n}")

    def check_pp(self, pp: int) -> None:
        if self.num_layers % pp:
            raise ValueError(f"pipeline-parallel size {pp} does not divide num_layers = {self.num_layers}")


def family_of(hf_config: dict[str, Any], source: str = "config.json") -> str:
    """Registry lookup: architectures[0], else model_type."""
    archs = hf_config.get("architectures") or []
    if archs:
        if archs[0] in ARCHITECTURES:
            return ARCHITECTURES[archs[0]]
        raise UnsupportedArchitecture(f"{source}: architecture '{archs[0]}' is not supported; supported: "
                                      f"{', '.join(sorted(ARCHITECTURES))}")
    mt = hf_config.get("model_type")
    if mt in MODEL_TYPES:
        return MODEL_TYPES[mt]
    raise UnsupportedArchitecture(f"{source}: model_type '{mt}' is not supported; supported architectures: "
                                  f"{', '.join(sorted(ARCHITECTURES))}")


def _rope_scaling(raw: Optional[dict], source: str) -> Optional[RopeScaling]:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedArchitecture(f"{source}: rope_scaling type '{kind}' is not supported (supported: llama3)")
    return RopeScaling(factor=float(raw["factor"]), low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
                       high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
                       original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)))


def arch_from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ArchSpec:
    """ArchSpec from a parsed HF config.json."""
    family = family_of(hf, source)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    return ArchSpec(
        family=family, vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
        num_layers=int(hf["num_hidden_layers"]), num_attention_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads), ffn_hidden_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)), rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(family == "qwen2") or bool(hf.get("attention_bias", False)),
        rope_scaling=_rope_scaling(scaling, source))


def load_hf_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    cfg = p / "config.json" if p.is_dir() else p
    if not cfg.is_file():
        raise RunError(f"no config.json in model directory '{path}'")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{cfg}: not valid JSON: {e}") from None


def arch_from_model_config(cfg: ModelConfig) -> ArchSpec:
    """ArchSpec from ``model.hf_path``'s config.json, or from the inline shape."""
    if cfg.hf_path:
        return arch_from_hf_config(load_hf_config(cfg.hf_path), str(Path(cfg.hf_path) / "config.json"))
    return ArchSpec(family=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                    num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, ffn_hidden_size=cfg.ffn_hidden_size,
                    max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                    rms_norm_eps=cfg.rms_norm_eps, tie_embeddings=cfg.tie_embeddings,
                    qkv_bias=cfg.family == "qwen2")


def rope_inv_freq(arch: ArchSpec):
    """Rotary inverse frequencies [head_dim/2], with Llama 3.x scaling applied exactly as HF does."""
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = arch.rope_scaling
    if s is None:
        return inv
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)
