"""Megatron <-> Hugging Face parameter mapping, driven by one table per architecture family.

Two kinds of knowledge live here, kept apart:

* Megatron's own layout (this file): which dimension each parameter is split on under tensor parallelism,
  how ``linear_fc1`` holds ``[gate_shard; up_shard]`` per TP rank, and the dist-checkpoint key of each
  parameter (the local spec's layer norms are stored under the Transformer Engine names, so checkpoints
  interchange between the two specs).
* The family tables (``checkpoints_convert/mappings/<family>.py``): which HF tensors make each Megatron
  parameter, fused how (``copy``, ``qkv`` per query group, ``gate_up``), and their shapes from ``ArchSpec``.

Names: a *global* Megatron name is a parameter name of the whole unsplit model, e.g.
``decoder.layers.7.self_attention.linear_qkv.weight`` (local spec; the TE-spec fused-norm names
``...linear_qkv.layer_norm_weight`` are accepted as aliases). A *full* tensor is TP-gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from checkpoints_convert.errors import ConvertError
from megatron_meml.model.arch import ArchSpec, UnsupportedArchitecture

LAYER_PREFIX = "decoder.layers."
HF_LAYER_PREFIX = "model.layers."
KINDS = ("copy", "qkv", "gate_up")


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One Megatron parameter and the HF tensor(s) it is made of."""

    megatron: str
    """Megatron (local spec) name; relative to ``decoder.layers.{i}.`` for layer rules."""
    hf: tuple[str, ...]
    """HF names, relative to ``model.layers.{i}.`` for layer rules; fused in this order."""
    kind: str = "copy"
    """copy (one HF tensor), qkv (q, k, v interleaved per query group) or gate_up (fc1 = [gate; up])."""
    hf_shapes: Callable[[ArchSpec], tuple[tuple[int, ...], ...]]
    """Shape of each HF tensor, from the architecture."""
    when: Callable[[ArchSpec], bool] = lambda arch: True
    """Whether the parameter exists for this architecture (q/k/v bias, untied output layer)."""
    tied_to: Optional[str] = None
    """HF tensor this parameter equals when ``when`` is false (the output layer of tied models)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Rule.kind must be one of {KINDS}, got '{self.kind}'")
        want = {"copy": 1, "qkv": 3, "gate_up": 2}[self.kind]
        if len(self.hf) != want:
            raise ValueError(f"Rule {self.megatron}: kind '{self.kind}' needs {want} HF names, got {self.hf}")


@dataclass(frozen=True, kw_only=True)
class Table:
    """A family's mapping: rules for parameters outside the layers and rules for each layer."""

    family: str
    """Registry key (``ArchSpec.family``)."""
    model_rules: tuple[Rule, ...]
    """Embedding, final norm, output layer."""
    layer_rules: tuple[Rule, ...]
    """Per transformer layer."""


# ---- Megatron's own layout (independent of the HF family) ------------------------------------------------
# name (layer-relative for layer params) -> (TP partition dim or None, layout: "plain" or "gate_up")
TP_LAYOUT: dict[str, tuple[Optional[int], str]] = {
    "embedding.word_embeddings.weight": (0, "plain"),
    "output_layer.weight": (0, "plain"),
    "decoder.final_layernorm.weight": (None, "plain"),
    "input_layernorm.weight": (None, "plain"),
    "self_attention.linear_qkv.weight": (0, "plain"),  # groups are contiguous per rank: plain row split
    "self_attention.linear_qkv.bias": (0, "plain"),
    "self_attention.linear_proj.weight": (1, "plain"),
    "pre_mlp_layernorm.weight": (None, "plain"),
    "mlp.linear_fc1.weight": (0, "gate_up"),
    "mlp.linear_fc2.weight": (1, "plain"),
}
# Transformer Engine spec names -> local spec names (same tensors); the dist checkpoint uses the TE names.
TE_ALIASES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
              "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
CKPT_NAMES = {v: k for k, v in TE_ALIASES.items()}
# Layer parameters that carry a (None-valued) ``_extra_state`` object in Megatron's dist checkpoints.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                       "mlp.linear_fc2")


def split_layer_name(name: str, prefix: str = LAYER_PREFIX) -> tuple[Optional[int], str]:
    """'decoder.layers.3.mlp.linear_fc2.weight' -> (3, 'mlp.linear_fc2.weight'); other names -> (None, name)."""
    if not name.startswith(prefix):
        return None, name
    idx, _, rest = name[len(prefix):].partition(".")
    if not idx.isdigit() or not rest:
        raise ConvertError(f"parameter name '{name}' has no layer index after '{prefix}'")
    return int(idx), rest


def canonical(suffix: str) -> str:
    return TE_ALIASES.get(suffix, suffix)


def ckpt_key(name: str) -> tuple[str, Optional[int]]:
    """Dist-checkpoint key and layer index of a global Megatron name (layer params are stacked on axis 0)."""
    layer, suffix = split_layer_name(name)
    if layer is None:
        return suffix, None
    suffix = canonical(suffix)
    return LAYER_PREFIX + CKPT_NAMES.get(suffix, suffix), layer


def _layout(name: str) -> tuple[Optional[int], str]:
    _, suffix = split_layer_name(name)
    try:
        return TP_LAYOUT[canonical(suffix)]
    except KeyError:
        raise ConvertError(f"no tensor-parallel layout known for Megatron parameter '{name}'") from None


def shard_for_tp(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s shard of the full Megatron tensor ``name`` (fc1: [gate_shard; up_shard])."""
    dim, layout = _layout(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % (2 * tp if layout == "gate_up" else tp):
        raise ConvertError(f"tensor-parallel size {tp} does not divide dim {dim} of '{name}' {tuple(full.shape)}")
    if layout == "gate_up":
        gate, up = full.chunk(2, dim)
        return torch.cat([gate.chunk(tp, dim)[rank], up.chunk(tp, dim)[rank]], dim)
    return full.chunk(tp, dim)[rank]


def gather_from_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard_for_tp``: the full tensor from every TP rank's shard, in rank order."""
    dim, layout = _layout(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if layout == "gate_up":
        halves = [s.chunk(2, dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(shards, dim)


def layer_offset(num_layers: int, pp: int, pp_rank: int) -> int:
    """Global index of pipeline stage ``pp_rank``'s first layer (even split, as ``ArchSpec.check_pp`` demands)."""
    return num_layers // pp * pp_rank


def to_global_name(local_name: str, num_layers: int, pp: int, pp_rank: int) -> str:
    """Stage-local parameter name -> global name (layer indices restart at 0 on every stage)."""
    layer, suffix = split_layer_name(local_name)
    if layer is None:
        return local_name
    return f"{LAYER_PREFIX}{layer + layer_offset(num_layers, pp, pp_rank)}.{suffix}"


def to_local_name(global_name: str, num_layers: int, pp: int) -> tuple[int, str]:
    """Global name -> (pipeline stage that holds it, stage-local name). Non-layer names go to stage 0 / last."""
    layer, suffix = split_layer_name(global_name)
    if layer is None:
        return (pp - 1 if suffix.startswith(("output_layer", "decoder.final_layernorm")) else 0), global_name
    per = num_layers // pp
    return layer // per, f"{LAYER_PREFIX}{layer % per}.{suffix}"


# ---- HF tensor shapes, for the family tables -----------------------------------------------------------
def shape_embedding(a: ArchSpec) -> tuple[tuple[int, ...], ...]:
    return ((a.vocab_size, a.hidden_size),)


def shape_norm(a: ArchSpec) -> tuple[tuple[int, ...], ...]:
    return ((a.hidden_size,),)


def shape_qkv_weight(a: ArchSpec) -> tuple[tuple[int, ...], ...]:
    kv = (a.num_kv_heads * a.head_dim, a.hidden_size)
    return ((a.num_attention_heads * a.head_dim, a.hidden_size), kv, kv)


def shape_qkv_bias(a: ArchSpec) -> tuple[tuple[int, ...], ...]:
    return ((a.num_attention_heads * a.head_dim,), (a.num_kv_heads * a.head_dim,), (a.num_kv_heads * a.head_dim,))


def shape_o_proj(a: ArchSpec) -> tuple[tuple[int, ...], ...]:
    return ((a.hidden_size, a.num_attention_heads * a.head_dim),)


def shape_gate_up(a: ArchSpec) -> tuple[tuple[int, ...], ...]:
    return ((a.ffn_hidden_size, a.hidden_size),) * 2


def shape_down(a: ArchSpec) -> tuple[tuple[int, ...], ...]:
    return ((a.hidden_size, a.ffn_hidden_size),)


def has_qkv_bias(a: ArchSpec) -> bool:
    return a.qkv_bias


def untied(a: ArchSpec) -> bool:
    return not a.tie_embeddings


# ---- fusing and splitting ---------------------------------------------------------------------------------
def fuse(kind: str, parts: list[torch.Tensor], arch: ArchSpec) -> torch.Tensor:
    """HF tensors -> one full Megatron tensor. qkv: for each query group, [its q heads, k, v]."""
    if kind == "copy":
        return parts[0]
    if kind == "gate_up":
        return torch.cat(parts, 0)
    q, k, v = parts
    g, d = arch.num_kv_heads, arch.head_dim
    rest = tuple(q.shape[1:])
    per = arch.num_attention_heads // g
    return torch.cat([q.reshape(g, per, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)],
                     1).reshape(g * (per + 2) * d, *rest)


def split(kind: str, full: torch.Tensor, arch: ArchSpec) -> list[torch.Tensor]:
    """Inverse of ``fuse``; every part is a fresh contiguous tensor (safe to save independently)."""
    if kind == "copy":
        return [full]
    if kind == "gate_up":
        return [t.clone() for t in full.chunk(2, 0)]
    g, d = arch.num_kv_heads, arch.head_dim
    per = arch.num_attention_heads // g
    rest = tuple(full.shape[1:])
    grouped = full.reshape(g, per + 2, d, *rest)
    return [grouped[:, :per].reshape(g * per * d, *rest).clone(), grouped[:, per].reshape(g * d, *rest).clone(),
            grouped[:, per + 1].reshape(g * d, *rest).clone()]


def megatron_shape(kind: str, hf_shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    if kind == "copy":
        return hf_shapes[0]
    return (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])


def unsupported(family: str, known) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(f"no conversion table for family '{family}'; supported: {', '.join(sorted(known))}")


def tp_regions(name: str, full_shape: tuple[int, ...], tp: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of the pieces Megatron stores for ``name`` when saved at TP size ``tp``, rank by rank.

    Concatenating rank r's pieces along the partition dim gives ``shard_for_tp(name, full, tp, r)``.
    """
    dim, layout = _layout(name)
    zero = (0,) * len(full_shape)
    if dim is None or tp == 1:
        return [(zero, tuple(full_shape))]
    halves = 2 if layout == "gate_up" else 1
    n = full_shape[dim] // (halves * tp)
    regions = []
    for r in range(tp):
        for h in range(halves):
            off, size = list(zero), list(full_shape)
            off[dim], size[dim] = h * full_shape[dim] // halves + r * n, n
            regions.append((tuple(off), tuple(size)))
    return regions
