"""The rollout interfaces: ``RolloutBackend`` (an engine: vLLM) and ``Rollout`` (what the stages call, shared by
every rank). Backend-specific calls stay inside each backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

import torch

from megatron_meml.types import Completion


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """What to sample for each prompt."""

    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus threshold."""
    max_tokens: int = 64
    """Maximum new tokens per sample."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens (EOS always stops)."""
    seed: Optional[int] = None
    """Sampling seed (per request); None: engine default."""


class WeightUpdateError(ValueError):
    """A weight push was refused before anything reached the engine (it keeps its old weights)."""


class RolloutBackend(Protocol):
    """A rollout engine: token ids in, completions (with sampling log-probs) out."""

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        """``spec.n`` completions per prompt, prompt-major: [len(prompts) * n]."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Replace the engine's weights with these Hugging Face-named tensors (a complete set); returns bytes pushed."""

    def sleep(self) -> None:
        """Free engine memory while the trainer runs (no-op where the platform has no sleep mode)."""

    def wake(self) -> None:
        """Undo ``sleep``."""

    def shutdown(self) -> None:
        """Stop the engine and free its resources."""


class Rollout(Protocol):
    """What the stages call: one engine shared by every rank of the job, fed the trainer's weights.

    Every method is collective (the same calls, in the same order, on every rank). ``submit`` + ``collect`` is one
    generation in two halves, so a generation can run while the trainer trains (``overlap``)."""

    version: int
    """Optimizer steps applied to the engine's weights (one per ``sync``); completions carry it."""

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        """``spec.n`` completions per prompt of this data-parallel replica, prompt-major."""

    def submit(self, prompts: list[list[int]], spec: SamplingSpec, *, overlap: bool = True) -> None:
        """Start generating; with ``overlap`` the engine works in the background until ``collect``."""

    def collect(self) -> tuple[list[Completion], float]:
        """(the completions of the last ``submit``, the engine's seconds on them)."""

    def sleep(self) -> None:
        """Free engine memory for the train phase (``sync`` wakes it)."""

    def sync(self) -> dict[str, float]:
        """Push the trainer's current weights into the engine; ``weight_sync/...`` metrics."""

    def shutdown(self) -> None:
        """Stop the engine and remove the start weights it was loaded from."""


@dataclass
class ExpectedWeights:
    """The engine's weight set: HF name -> shape; validated before every push."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def validate(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Raise WeightUpdateError naming the first unknown, missing, duplicated or mis-shaped tensor."""
        seen: set[str] = set()
        for name, t in named:
            if name not in self.shapes:
                raise WeightUpdateError(f"weight push: unknown tensor '{name}' (not in the engine's checkpoint)")
            if name in seen:
                raise WeightUpdateError(f"weight push: tensor '{name}' appears twice")
            seen.add(name)
            if tuple(t.shape) != self.shapes[name]:
                raise WeightUpdateError(f"weight push: tensor '{name}' has shape {tuple(t.shape)}, the engine "
                                        f"expects {self.shapes[name]}")
            if not t.is_floating_point():
                raise WeightUpdateError(f"weight push: tensor '{name}' has dtype {t.dtype}, expected floating point")
        missing = sorted(set(self.shapes) - seen)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightUpdateError(f"weight push: tensor '{missing[0]}' is missing{more}; a push must be complete")
