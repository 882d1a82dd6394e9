"""Rollout engine and sampling configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

BACKENDS = ("vllm", "hf")
ENGINE_MODES = ("auto", "inprocess", "multiprocess")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How responses are sampled."""

    backend: str = "vllm"
    """vllm (production and CPU fidelity) or hf (transformers generate; debugging only)."""
    samples_per_expert: int = 8
    """G: responses sampled per (question, expert)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 256
    """Maximum response length in tokens."""
    max_prompt_tokens: int = 160
    """Longest prompt (system prompt + question, chat template included) in tokens; ``meml plan`` sizes
    training activations and the vLLM KV cache for max_prompt_tokens + max_new_tokens."""
    engine_mode: str = "auto"
    """auto (in-process for one rank, own process under torchrun), inprocess, multiprocess."""
    tensor_parallel_size: int = 1
    """vLLM tensor-parallel size (GPU)."""
    gpu_memory_utilization: float = 0.5
    """vLLM GPU memory fraction (colocated with training)."""
    kv_cache_gb: float = 1.0
    """KV cache size on CPU, GiB."""
    block_size: int = 0
    """vLLM's KV-cache block size in tokens. Prefix caching shares whole blocks only, so a smaller block lets the G
    samples of a prompt (and prompts under one system prompt) share more of it instead of each prefilling it again.
    0: 32 on CPU (the smallest its attention kernel takes; vLLM picks 128 there), vLLM's own choice on GPU. On CPU it
    must be a multiple of 32."""
    sleep_between_steps: bool = True
    """Free engine memory during training where the platform supports sleep mode (GPU)."""
    sync_bucket_mb: int = 256
    """Weight-sync bucket size."""
    seed: Optional[int] = None
    """Sampling seed; None: derived from the run seed and step."""
    max_staleness: int = 0
    """Asynchronous off-policy rollouts: step t trains on samples drawn by the weights of step t - N, generated while
    step t - 1 trained (0: on-policy, generate then train). The loss corrects with the behaviour log-probs (TIS)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"rollout.backend must be one of {BACKENDS}, got '{self.backend}'")
        if self.engine_mode not in ENGINE_MODES:
            raise ValueError(f"rollout.engine_mode must be one of {ENGINE_MODES}, got '{self.engine_mode}'")
        if self.samples_per_expert < 1:
            raise ValueError(f"rollout.samples_per_expert must be >= 1, got {self.samples_per_expert}")
        if self.max_prompt_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_prompt_tokens and rollout.max_new_tokens must be >= 1, got "
                             f"{self.max_prompt_tokens} and {self.max_new_tokens}")
        if self.block_size < 0:
            raise ValueError(f"rollout.block_size must be >= 0 (0: the platform's choice), got {self.block_size}")
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
