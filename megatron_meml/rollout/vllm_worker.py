"""Worker extension loaded into vLLM's worker (its own process under multi-rank jobs): weight updates from
safetensors bytes or a file, through vLLM's in-place ``reload_weights`` (plain ``load_weights`` silently does nothing
on CPU, where linear weights are repacked)."""
from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class via ``worker_extension_cls``; methods are called with ``collective_rpc``."""

    def meml_load_safetensors_bytes(self, data: bytes) -> int:
        from safetensors.torch import load

        tensors = load(data)
        self.reload_weights(weights_iterator=list(tensors.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(tensors)

    def meml_load_safetensors_file(self, path: str) -> int:
        from safetensors.torch import load_file

        tensors = load_file(path)
        self.reload_weights(weights_iterator=list(tensors.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(tensors)
