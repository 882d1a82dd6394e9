"""Hugging Face <-> Megatron-Core checkpoint conversion for the Qwen2/Qwen2.5 and Llama 3.x families.

``python -m checkpoints_convert {hf-to-megatron,megatron-to-hf,verify} --help``. The name/tensor mapping
(``megatron_to_hf``, ``hf_to_megatron``, ``shard_for_tp``, ``gather_from_tp``) is shared with the vLLM weight sync.
"""
from checkpoints_convert.mapping import (ConvertError, gather_from_tp, layer_offset, shard_for_tp, to_global_name,
                                         to_local_name)
from checkpoints_convert.mappings import (TABLES, expected_shape, hf_names_of, hf_to_megatron, megatron_names,
                                          megatron_to_hf)

__all__ = ["ConvertError", "TABLES", "expected_shape", "gather_from_tp", "hf_names_of", "hf_to_megatron",
           "layer_offset", "megatron_names", "megatron_to_hf", "shard_for_tp", "to_global_name", "to_local_name"]
