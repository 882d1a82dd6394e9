"""Verifiers: answer extraction in the configured format and answer checking (math, choice, bool)."""
from megatron_meml.rewards.config import RewardConfig
from megatron_meml.rewards.extract import answer_in_format, extract_answer, format_answer
from megatron_meml.rewards.math_equiv import warm_up
from megatron_meml.rewards.score import STATUSES, Score, option_letter, score, score_last_number

__all__ = ["RewardConfig", "STATUSES", "Score", "answer_in_format", "extract_answer", "format_answer", "option_letter",
           "score", "score_last_number", "warm_up"]
