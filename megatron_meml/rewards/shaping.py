"""Reward shaping on top of the verifier's reward: DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13).

With maximum length L_max and a buffer of L_cache tokens, a response of |y| tokens gets

    0                                   if |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max   (0 down to -1, linearly)
    -1                                  if |y| > L_max

times a penalty factor, added to its reward. It enters the advantages only: correctness (mutual-learning pairs,
hard-example admission, reward metrics) stays the verifier's, so a long correct answer is still a correct answer.
As NeMo-RL (``reward_shaping.overlong_buffer_*``) and verl (``overlong_buffer``) set it.
"""
from __future__ import annotations


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """The soft overlong penalty (<= 0) of a response of ``length`` tokens; 0 when ``buffer`` is 0."""
    if buffer <= 0:
        return 0.0
    if buffer > max_length:
        raise ValueError(f"overlong buffer {buffer} is longer than the maximum length {max_length}")
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length > max_length:
        return -factor
    return factor * (start - length) / buffer
