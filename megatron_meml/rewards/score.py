"""``score(problem, response)``: the verifiable reward. Pure, never raises on model output, bounded in time.

Status: ``correct`` (reward 1), ``wrong`` (an answer was found and is not the gold one), ``no_answer`` (no
answer could be extracted: a format failure), ``timeout`` (the symbolic check ran out of time; reward 0).

- math: the extracted answer against ``problem.answer`` (:func:`math_equal`).
- choice: the option letter (``c``, ``(c)``, ``c )``, ``option c``), or an option's value mapped back to its
  letter; MathQA-style rationale endings ("answer : c", "d is the answer", "option b") as a fallback.
- bool: yes/no/true/false.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

from megatron_meml.rewards.config import RewardConfig
from megatron_meml.rewards.extract import extract_answer
from megatron_meml.rewards.math_equiv import math_equal, plain_number
from megatron_meml.types import Problem

log = logging.getLogger(__name__)

STATUSES = ("correct", "wrong", "no_answer", "timeout")
_DEFAULT = RewardConfig()
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LETTER_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:option|choice|answer)?\s*(?:is)?\s*[:\-]?\s*", re.I)
_LETTER = re.compile(r"^\(?\s*([a-z])\s*(?:\)|\.|:|$)(.*)$", re.I | re.S)
_KEYWORD_LETTER = re.compile(
    r"\b(?:answer|ans|option|choice)s?\b[^a-z0-9]{0,6}(?:(?:is|will|would|should|must|be|definitely|hence|the|"
    r"correct|right|choice)\b[^a-z0-9]{0,6})*\(?\s*([a-e])\b(?![.,]?\s*(?!(?:is|it|has)\b)[a-z]{2})", re.I)
_LETTER_IS_ANSWER = re.compile(r"\b\(?([a-e])\)?\s+(?:is|should\s+be|would\s+be|must\s+be)\s+(?:the\s+)?"
                               r"(?:correct|right|answer|option|choice)\b", re.I)
_TRAILING_LETTER = re.compile(r"(?:^|[^a-z0-9])[(\[]?\s*([a-e])\s*[)\]]?\s*[.!]?\s*$", re.I)
_TRAILING_PAREN_LETTER = re.compile(r"\(\s*([a-e])\s*\)[^()]{0,24}$", re.I)
_CHOICE_TIERS = ((_KEYWORD_LETTER, _LETTER_IS_ANSWER), (_TRAILING_LETTER, _TRAILING_PAREN_LETTER))
"""Fallbacks when no marked answer maps to an option: explicit wording first, then a letter ending the text."""
_BOOL_WORD = re.compile(r"^\W*(yes|no|true|false)\b", re.I)
_BOOL_FALLBACK = re.compile(r"\b(?:answer|ans)\b\W{0,6}(yes|no|true|false)\b", re.I)


@dataclass(frozen=True, kw_only=True)
class Score:
    """The verdict on one response."""

    reward: float
    """1.0 correct, else 0.0."""
    extracted: Optional[str]
    """The answer found in the response (an option letter / yes / no for choice and bool; None: none found)."""
    status: str
    """correct | wrong | no_answer | timeout."""


def score(problem: Problem, response_text: str, answer_format: str = "the_answer_is",
          cfg: RewardConfig = _DEFAULT) -> Score:
    """Score ``response_text`` against ``problem``'s gold answer; ``answer_format`` is what the prompt asked for."""
    try:
        return score_strict(problem, response_text if isinstance(response_text, str) else str(response_text),
                            answer_format, cfg)
    except Exception as e:  # noqa: BLE001 - a bug here must not kill a rollout; it is logged, scored wrong
        log.warning("verifier error on problem %s: %s: %s", problem.id, type(e).__name__, e)
        return Score(reward=0.0, extracted=None, status="wrong")


def score_strict(problem: Problem, text: str, answer_format: str, cfg: RewardConfig = _DEFAULT) -> Score:
    """:func:`score` without the last-resort exception guard (tests call this so a bug cannot hide)."""
    if problem.kind == "choice":
        return _score_choice(problem, text, answer_format, cfg)
    if problem.kind == "bool":
        return _score_bool(problem, text, answer_format, cfg)
    return _score_math(problem, text, answer_format, cfg)


def _verdict(ok: Optional[bool], extracted: Optional[str]) -> Score:
    if extracted is None:
        return Score(reward=0.0, extracted=None, status="no_answer")
    if ok is None:
        return Score(reward=0.0, extracted=extracted, status="timeout")
    return Score(reward=1.0 if ok else 0.0, extracted=extracted, status="correct" if ok else "wrong")


def _score_math(problem: Problem, text: str, fmt: str, cfg: RewardConfig) -> Score:
    answer = extract_answer(text, fmt, cfg.tail_chars)
    if answer is None and cfg.last_number_fallback:
        answer = last_number(text, cfg.tail_chars)
    if answer is None:
        return _verdict(None, None)
    return _verdict(math_equal(problem.answer, answer, cfg), answer)


def last_number(text: str, tail_chars: int) -> Optional[str]:
    """The last number written in the tail of ``text`` (None: no digit there)."""
    nums = _LAST_NUMBER.findall(text[-tail_chars:])
    return nums[-1] if nums else None


def score_last_number(problem: Problem, response_text: str, cfg: RewardConfig = _DEFAULT) -> Score:
    """The skill read-out for math problems: the response's *last number*, whatever its format, against the gold
    answer (status no_answer when the response has no number). Scored against :func:`score`'s format-bound reward,
    it separates arithmetic from answer-format compliance. Never raises on model output."""
    if problem.kind != "math":
        raise ValueError(f"score_last_number is for math problems; problem {problem.id} is '{problem.kind}'")
    try:
        answer = last_number(str(response_text), cfg.tail_chars)
        return _verdict(None if answer is None else math_equal(problem.answer, answer, cfg), answer)
    except Exception as e:  # noqa: BLE001 - as in score(): logged, scored wrong
        log.warning("last-number verifier error on problem %s: %s: %s", problem.id, type(e).__name__, e)
        return Score(reward=0.0, extracted=None, status="wrong")


# ---------------------------------------------------------------------------------------------- choice
def option_letter(candidate: str, options: tuple[tuple[str, str], ...]) -> Optional[str]:
    """The option letter ``candidate`` names: a letter form (``c``, ``(c) 30``, ``option c``), or a value equal
    to exactly one option's value (string-normalised, else as a plain number). None: no or several options."""
    letters = {k.lower() for k, _ in options}
    c = _LETTER_PREFIX.sub("", candidate.strip(" `'\"*"), count=1)
    m = _LETTER.match(c)
    if m and m.group(1).lower() in letters:
        rest = m.group(2).strip()
        value = dict(options)[m.group(1).lower()]
        if not rest or rest.startswith(("(", ")", "=", ":")) or _norm_value(rest) == _norm_value(value) or _is_separator(c):
            return m.group(1).lower()
    hits = [k for k, v in options if _norm_value(v) and _norm_value(v) == _norm_value(candidate)]
    if not hits:
        num = plain_number(candidate)
        if num is not None:
            hits = [k for k, v in options if plain_number(v) is not None and plain_number(v)[0] == num[0]]
    return hits[0].lower() if len(hits) == 1 else None


def _is_separator(c: str) -> bool:
    """``(c) ...`` or ``c ) ...``: a letter set off by a bracket is a letter even when followed by text."""
    return bool(re.match(r"^\(\s*[a-z]\s*\)|^[a-z]\s*\)", c, re.I))


def _norm_value(v: str) -> str:
    """Lower-case, no spaces, currency or trailing punctuation: ``"Rs . 1,200 ."`` -> ``"1,200"``."""
    v = re.sub(r"\b(?:rs|inr|usd)\b\s*\.?", "", v.strip().lower())
    return re.sub(r"[\s$`*]+", "", v).rstrip(".,;:!")


def _score_choice(problem: Problem, text: str, fmt: str, cfg: RewardConfig) -> Score:
    tail = text[-cfg.tail_chars:]
    candidate = extract_answer(tail, fmt, cfg.tail_chars)
    if candidate is not None:
        letter = option_letter(candidate[: cfg.max_answer_chars], problem.options)
        if letter is not None:
            return _verdict(letter == problem.answer.lower(), letter)
    unquoted = re.sub(r"[`'\"]", " ", tail)
    for tier in _CHOICE_TIERS:
        letter = _last_of(tier, unquoted)
        if letter is not None and letter.lower() in {k for k, _ in problem.options}:
            return _verdict(letter.lower() == problem.answer.lower(), letter.lower())
    numbers = _LAST_NUMBER.findall(tail[-200:])
    letter = option_letter(numbers[-1], problem.options) if numbers else None
    if letter is not None:
        return _verdict(letter == problem.answer.lower(), letter)
    if candidate is not None:
        return Score(reward=0.0, extracted=candidate[: cfg.max_answer_chars], status="wrong")
    return _verdict(None, None)


def _last_of(patterns: tuple[re.Pattern, ...], text: str) -> Optional[str]:
    best: Optional[tuple[int, str]] = None
    for pat in patterns:
        for m in pat.finditer(text):
            if best is None or m.start() >= best[0]:
                best = (m.start(), m.group(1))
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------- bool
def _yes_no(word: str) -> str:
    return "yes" if word.lower() in ("yes", "true") else "no"


def _score_bool(problem: Problem, text: str, fmt: str, cfg: RewardConfig) -> Score:
    tail = text[-cfg.tail_chars:]
    candidate = extract_answer(tail, fmt, cfg.tail_chars)
    word = _BOOL_WORD.match(candidate) if candidate is not None else None
    if word is None:
        fallback = _last_of((_BOOL_FALLBACK,), tail)
        if fallback is None and len(tail.strip()) <= 8:
            bare = _BOOL_WORD.match(tail.strip())
            fallback = bare.group(1) if bare else None
        if fallback is None and candidate is None:
            return _verdict(None, None)
        if fallback is None:
            return Score(reward=0.0, extracted=candidate[: cfg.max_answer_chars], status="wrong")
        got = _yes_no(fallback)
    else:
        got = _yes_no(word.group(1))
    return _verdict(got == problem.answer.strip().lower(), got)
