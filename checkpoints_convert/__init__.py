"""Hugging Face <-> Megatron-Core checkpoint conversion for the Qwen2/Qwen2.5 and Llama 3.x families.

``python -m checkpoints_convert {fetch,hf-to-megatron,megatron-to-hf,verify} --help``. The name/tensor mapping
(``megatron_to_hf``, ``hf_to_megatron``, ``shard_for_tp``, ``gather_from_tp``) is shared with the vLLM weight sync.
The names below are imported on first use, so that ``fetch`` with its model already in place starts without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from checkpoints_convert.errors import ConvertError

_LAZY = {**{name: "checkpoints_convert.mapping" for name in ("gather_from_tp", "layer_offset", "shard_for_tp",
                                                               "to_global_name", "to_local_name")},
         **{name: "checkpoints_convert.mappings" for name in ("TABLES", "expected_shape", "hf_names_of",
                                                                "hf_to_megatron", "megatron_names",
                                                                "megatron_to_hf")}}

__all__ = ["ConvertError", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'checkpoints_convert' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
