"""Worker extension loaded into vLLM's worker (its own process under multi-rank jobs): weight updates from
safetensors bytes or a file, through vLLM's in-place ``reload_weights`` (plain ``load_weights`` silently does nothing
on CPU, where linear weights are repacked)."""
from __future__ import annotations


class WeightSyncExtension:
    """Mixed into vLLM's worker class via ``worker_extension_cls``; methods are called with ``collective_rpc``."""

    def meml_load_safetensors_bytes(self, data: bytes, tied: bool = False) -> int:
        from safetensors.torch import load

        return self._meml_reload(load(data), tied)

    def meml_load_safetensors_file(self, path: str, tied: bool = False) -> int:
        from safetensors.torch import load_file

        return self._meml_reload(load_file(path), tied)

    def _meml_reload(self, tensors: dict, tied: bool) -> int:
        if tied:  # the in-place reload unties lm_head from the embedding on CPU: load it explicitly
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        self.reload_weights(weights_iterator=list(tensors.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(tensors)
