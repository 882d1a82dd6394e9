"""Answer formats: how an expert is told to write its final answer, and how that answer is found again.

Formats (``experts.answer_format``): ``boxed`` (``\\boxed{X}``), ``the_answer_is`` ("The answer is X."),
``hash`` (``#### X``). Extraction reads only the tail of a response, takes the *last* match of the configured
format, and when that format is absent falls back to the last match of any other marker (the other two
formats, or "Answer: X"). All scanning is linear and bounded, so any input finishes quickly.
"""
from __future__ import annotations

import re
from typing import Optional

from megatron_meml.types import ANSWER_FORMATS

_THE_ANSWER_IS = re.compile(r"answer\s+is\b[\s:*]*", re.IGNORECASE)
_HASH = re.compile(r"####[ \t]*")
_ANSWER_COLON = re.compile(r"\banswer\b\W{0,4}?[:=][ \t*]*", re.IGNORECASE)
_BOX_CMDS = ("\\boxed", "\\fbox")
_MAX_BOX_TRIES = 32
_SENTENCE_END = re.compile(r";|[.!?](?=\s+[A-Z]|\s*$)")
"""Where a sentence ends after an answer: ';', or '.', '!', '?' before a capital or the end ("3.5. Done")."""
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`"))


def format_answer(answer: str, answer_format: str) -> str:
    """The final answer line an expert writes in ``answer_format`` (the inverse of extraction)."""
    if answer_format == "boxed":
        return f"\\boxed{{{answer}}}"
    if answer_format == "the_answer_is":
        return f"The answer is {answer}."
    if answer_format == "hash":
        return f"#### {answer}"
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got '{answer_format}'")


def last_boxed(text: str) -> Optional[tuple[int, str]]:
    """(position, content) of the last well-formed ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed X``)."""
    end = len(text)
    for _ in range(_MAX_BOX_TRIES):
        start = max(text.rfind(cmd, 0, end) for cmd in _BOX_CMDS)
        if start < 0:
            return None
        j = start + (6 if text.startswith("\\boxed", start) else 5)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            close = _matching_brace(text, j)
            if close is not None:
                return start, text[j + 1: close]
        elif j < len(text) and j > start + 5 and text[j - 1] == " ":
            word = re.match(r"[^\s$]+", text[j:])
            if word:
                return start, word.group(0)
        end = start
    return None


def _matching_brace(text: str, open_at: int) -> Optional[int]:
    depth = 0
    for k in range(open_at, len(text)):
        ch = text[k]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return k
    return None


def _last_regex(marker: re.Pattern, text: str) -> Optional[tuple[int, str]]:
    """(position, rest of that line) for the last ``marker`` match followed by a non-empty answer."""
    for m in reversed(list(marker.finditer(text))[-_MAX_BOX_TRIES:]):
        line_end = text.find("\n", m.end())
        answer = text[m.end(): line_end if line_end >= 0 else len(text)]
        if answer.strip():
            return m.start(), answer
    return None


def find_marked(text: str, mode: str) -> Optional[tuple[int, str]]:
    """(position, raw answer text) of the last answer marked in ``mode`` (a format or ``answer_colon``)."""
    if mode == "boxed":
        return last_boxed(text)
    pattern = {"the_answer_is": _THE_ANSWER_IS, "hash": _HASH, "answer_colon": _ANSWER_COLON}[mode]
    return _last_regex(pattern, text)


def extract_answer(text: str, answer_format: str, tail_chars: int) -> Optional[str]:
    """The cleaned final answer of ``text`` (None: no marker found). The configured format's last match wins;
    without one, the last-positioned match of any other marker."""
    tail = text[-tail_chars:]
    hit = find_marked(tail, answer_format)
    if hit is None:
        others = [find_marked(tail, m) for m in (*ANSWER_FORMATS, "answer_colon") if m != answer_format]
        found = [h for h in others if h is not None]
        hit = max(found, key=lambda h: h[0]) if found else None
    if hit is None:
        return None
    answer = clean_answer(hit[1])
    return answer or None


def answer_in_format(text: str, answer_format: str, tail_chars: int) -> bool:
    """Whether ``text`` ends with a non-empty answer in ``answer_format`` itself (the other markers that
    :func:`extract_answer` falls back to do not count): the format-compliance read-out, apart from correctness."""
    hit = find_marked(text[-tail_chars:], answer_format)
    return hit is not None and bool(clean_answer(hit[1]))


def clean_answer(raw: str) -> str:
    """Strip the dressing around an answer: an inner ``\\boxed{}``, ``$...$``, bold, a trailing sentence."""
    s = raw.strip()
    inner = last_boxed(s) if "\\boxed" in s or "\\fbox" in s else None
    if inner is not None:
        s = inner[1].strip()
    else:
        end = _SENTENCE_END.search(s)
        if end is not None:
            s = s[: end.start()]
    for _ in range(3):
        s = s.strip().rstrip(".,;:!").strip()
        for left, right in _WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left): len(s) - len(right)]
                break
        s = s.strip("*").strip()
    return s
