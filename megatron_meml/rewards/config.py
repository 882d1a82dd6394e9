"""Verifier limits: how much of a response is read and how long answer checking may take."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Bounds that keep every verifier call fast on any model output."""

    tail_chars: int = 4096
    """Only the last this many characters of a response are scanned for the answer (the answer comes last)."""
    max_answer_chars: int = 200
    """An extracted answer longer than this is scored wrong without symbolic checking."""
    max_brace_depth: int = 8
    """An extracted answer nested deeper than this in {} is scored wrong without symbolic checking."""
    timeout_s: float = 0.5
    """Wall-clock limit of one math-verify check (main thread only: it uses SIGALRM); over it: status timeout."""
    last_number_fallback: bool = False
    """Math: when no answer marker is found at all, take the last number of the response (else no_answer)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment (rewards/shaping.py): responses longer than rollout.max_new_tokens minus
    this many tokens lose up to ``overlong_penalty`` of reward, linearly over the buffer; it shapes the
    advantages only. 0 disables."""
    overlong_penalty: float = 1.0
    """The soft overlong punishment's factor: the penalty at the full length."""

    def __post_init__(self) -> None:
        if self.tail_chars < 64:
            raise ValueError(f"reward.tail_chars must be >= 64, got {self.tail_chars}")
        if self.max_answer_chars < 1:
            raise ValueError(f"reward.max_answer_chars must be >= 1, got {self.max_answer_chars}")
        if self.max_brace_depth < 0:
            raise ValueError(f"reward.max_brace_depth must be >= 0, got {self.max_brace_depth}")
        if self.overlong_buffer < 0 or self.overlong_penalty < 0:
            raise ValueError("reward.overlong_buffer and reward.overlong_penalty must be >= 0")
        if not 0.0 < self.timeout_s <= 10.0:
            raise ValueError(f"reward.timeout_s must be in (0, 10], got {self.timeout_s}")
