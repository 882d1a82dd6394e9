"""Registry of family tables (keyed by ``ArchSpec.family``, the explicit registry key from config.json) and the
name/tensor conversion functions the converter and the vLLM weight sync share."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from checkpoints_convert.mapping import (HF_LAYER_PREFIX, LAYER_PREFIX, ConvertError, Rule, Table, canonical,
                                         fuse, megatron_shape, split, split_layer_name, unsupported)
from checkpoints_convert.mappings import llama, qwen2
from megatron_meml.model.arch import ArchSpec

TABLES: dict[str, Table] = {qwen2.TABLE.family: qwen2.TABLE, llama.TABLE.family: llama.TABLE}


def table_for(arch: ArchSpec) -> Table:
    try:
        return TABLES[arch.family]
    except KeyError:
        raise unsupported(arch.family, TABLES) from None


def rule_for(arch: ArchSpec, megatron_name: str) -> tuple[Rule, Optional[int]]:
    """The table rule of a global Megatron name and its layer index (None outside the layers)."""
    layer, suffix = split_layer_name(megatron_name)
    table = table_for(arch)
    rules = table.model_rules if layer is None else table.layer_rules
    suffix = canonical(suffix) if layer is not None else suffix
    for rule in rules:
        if rule.megatron == suffix:
            if layer is not None and not 0 <= layer < arch.num_layers:
                raise ConvertError(f"'{megatron_name}': layer {layer} out of range (num_layers = {arch.num_layers})")
            return rule, layer
    raise ConvertError(f"Megatron parameter '{megatron_name}' has no mapping in the '{table.family}' table")


def _hf_name(rule: Rule, name: str, layer: Optional[int]) -> str:
    return name if layer is None else f"{HF_LAYER_PREFIX}{layer}.{name}"


def hf_names_of(arch: ArchSpec, megatron_name: str) -> list[str]:
    """HF tensor names that make up ``megatron_name`` (empty for the output layer of a tied model)."""
    rule, layer = rule_for(arch, megatron_name)
    return [_hf_name(rule, n, layer) for n in rule.hf] if rule.when(arch) else []


def expected_shape(arch: ArchSpec, megatron_name: str) -> tuple[int, ...]:
    """Full (TP-gathered) shape of a global Megatron parameter."""
    rule, _ = rule_for(arch, megatron_name)
    return megatron_shape(rule.kind, rule.hf_shapes(arch))


def expected_hf_shapes(arch: ArchSpec, megatron_name: str) -> dict[str, tuple[int, ...]]:
    rule, layer = rule_for(arch, megatron_name)
    if not rule.when(arch):
        return {}
    return {_hf_name(rule, n, layer): s for n, s in zip(rule.hf, rule.hf_shapes(arch))}


def megatron_names(arch: ArchSpec) -> Iterator[str]:
    """Every global Megatron parameter name of the model, in model order (tied output layer excluded)."""
    table = table_for(arch)
    first, rest = table.model_rules[0], table.model_rules[1:]
    yield first.megatron
    for i in range(arch.num_layers):
        for rule in table.layer_rules:
            if rule.when(arch):
                yield f"{LAYER_PREFIX}{i}.{rule.megatron}"
    for rule in rest:
        if rule.when(arch):
            yield rule.megatron


def megatron_to_hf(arch: ArchSpec, megatron_name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Full Megatron tensor -> [(HF name, tensor)]; [] for the output layer of a tied model."""
    rule, layer = rule_for(arch, megatron_name)
    if not rule.when(arch):
        return []
    want = megatron_shape(rule.kind, rule.hf_shapes(arch))
    if tuple(full.shape) != want:
        raise ConvertError(f"Megatron tensor '{megatron_name}' has shape {tuple(full.shape)}, expected {want} "
                           "from config.json")
    return [(_hf_name(rule, n, layer), t) for n, t in zip(rule.hf, split(rule.kind, full, arch))]


def hf_to_megatron(arch: ArchSpec, megatron_name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Full Megatron tensor ``megatron_name`` built from HF tensors fetched by ``get(hf_name)`` (lazily)."""
    rule, layer = rule_for(arch, megatron_name)
    if not rule.when(arch):
        if rule.tied_to is None:
            raise ConvertError(f"'{megatron_name}' does not exist for this architecture")
        return get(rule.tied_to)
    parts = []
    for name, shape in zip(rule.hf, rule.hf_shapes(arch)):
        full_name = _hf_name(rule, name, layer)
        t = get(full_name)
        if tuple(t.shape) != tuple(shape):
            raise ConvertError(f"tensor '{full_name}' has shape {tuple(t.shape)}, expected {tuple(shape)} from "
                               "config.json")
        parts.append(t)
    return fuse(rule.kind, parts, arch)
