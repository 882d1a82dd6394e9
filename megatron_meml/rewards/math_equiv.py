"""Mathematical answer equivalence: an exact decimal fast path, then math-verify under a hard time limit.

The fast path decides when both sides are a *plain number*: one decimal number, possibly with thousands
commas, a sign, a currency sign, a percent sign, LaTeX spacing or a unit word (``$1,080``, ``-3.5``, ``25%``,
``72 \\text{ dollars}``); they are compared exactly as decimals, so a +1 change of a 9-digit number is caught.
Anything else (fractions, expressions, LaTeX) goes to math-verify's ``parse``/``verify`` with math-verify's own
signal timeouts disabled and one SIGALRM deadline of our own around both calls (in the main thread; elsewhere
signals cannot be used, so only the input caps apply and answers with powers/factorials are not expanded).
"""
from __future__ import annotations

import logging
import re
import signal
import threading
import time
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Iterator, Optional

from math_verify import parse, verify

from megatron_meml.rewards.config import RewardConfig

log = logging.getLogger(__name__)

_NUM = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+")
_TEXT_WRAP = re.compile(r"\\(?:text|mathrm|textbf|mbox|textit)\s*\{([^{}]*)\}")
_LATEX_NOISE = ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "{,}", "\\left", "\\right", "^\\circ", "^{\\circ}", "\\circ")
_PREFIX = re.compile(r"^\s*[a-zA-Z]{0,12}\s*[:=]\s*")
_NON_PLAIN = re.compile(r"[\d/^*+=<>\\{}()\[\]|]")
_RISKY = re.compile(r"\^|!|\*\*|\\binom|\\prod|\\sum|\\int|\\lim")


class VerifyTimeout(BaseException):
    """Raised by our SIGALRM deadline. A BaseException so that math-verify's ``except Exception`` cannot swallow it."""


def plain_number(text: str) -> Optional[tuple[Decimal, bool]]:
    """(value, has_percent) when ``text`` is one plain decimal number with only non-mathematical dressing."""
    s = _TEXT_WRAP.sub(r" \1 ", text)
    for noise in _LATEX_NOISE:
        s = s.replace(noise, " " if noise in ("\\ ", "\\,", "\\;", "\\:") else "")
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\\%", "%")
    s = _PREFIX.sub("", s, count=1)
    nums = list(_NUM.finditer(s))
    if len(nums) != 1:
        return None
    m = nums[0]
    rest = s[: m.start()] + " " + s[m.end():]
    if _NON_PLAIN.search(rest):
        return None
    if m.start() > 0 and s[m.start() - 1].isalpha():
        return None
    try:
        value = Decimal(m.group(0).replace(",", ""))
    except InvalidOperation:
        return None
    return value, ("%" in rest or "percent" in rest.lower())


def numbers_equal(gold: tuple[Decimal, bool], pred: tuple[Decimal, bool]) -> bool:
    """Exact decimal equality; a percent on one side may also be read as a fraction (25% == 0.25)."""
    (g, g_pct), (p, p_pct) = gold, pred
    if g == p:
        return True
    return (p_pct and not g_pct and g == p / 100) or (g_pct and not p_pct and g / 100 == p)


@contextmanager
def deadline(seconds: float) -> Iterator[bool]:
    """Raise :class:`VerifyTimeout` in the body after ``seconds`` (main thread only; yields whether it is armed).

    Saves and restores any outer SIGALRM handler/timer (e.g. pytest-timeout's), re-arming it for the time it
    had left. The alarm repeats every 50 ms until disarmed, in case library code swallows the first one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    state = {"armed": True}

    def on_alarm(signum, frame):  # noqa: ARG001
        if state["armed"]:
            raise VerifyTimeout()

    started = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield True
    finally:
        state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            left = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


_WARM = False


def _math_verify(gold: str, pred: str) -> bool:
    g = parse(_as_latex(gold), parsing_timeout=None)
    p = parse(_as_latex(pred), parsing_timeout=None)
    return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))


def _as_latex(s: str) -> str:
    return s if "$" in s or "\\(" in s or "\\[" in s else f"${s}$"


def warm_up() -> None:
    """Import math-verify and its LaTeX parser once, outside any deadline (the first use costs about 1 s).

    Called on the first symbolic check; call it at worker start-up to keep that second out of a scored call.
    Also silences math-verify's notice that its own timeouts are off (our :func:`deadline` replaces them).
    """
    global _WARM
    if not _WARM:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(lambda rec: "Timeout is disabled" not in rec.getMessage())
        _math_verify("\\frac{1}{2}", "0.5")
        _WARM = True


def brace_depth(s: str) -> int:
    depth = peak = 0
    for ch in s:
        if ch == "{":
            depth += 1
            peak = max(peak, depth)
        elif ch == "}":
            depth = max(depth - 1, 0)
    return peak


def math_equal(gold: str, pred: str, cfg: RewardConfig) -> Optional[bool]:
    """True/False: ``pred`` is/is not equal to ``gold``; None: the symbolic check ran out of time."""
    g, p = plain_number(gold), plain_number(pred)
    if g is not None and p is not None:
        return numbers_equal(g, p)
    if len(pred) > cfg.max_answer_chars or brace_depth(pred) > cfg.max_brace_depth:
        return False
    warm_up()
    try:
        with deadline(cfg.timeout_s) as armed:
            if not armed and _RISKY.search(pred):
                return _normalized(gold) == _normalized(pred)
            result = _math_verify(gold, pred)
    except VerifyTimeout:
        return None
    except Exception as e:  # noqa: BLE001 - a verifier never raises on model output
        log.debug("math-verify failed on %r: %s", pred[:80], e)
        result = False
    return result or _normalized(gold) == _normalized(pred)


def _normalized(s: str) -> str:
    return re.sub(r"\s+", "", s).lower()
