"""Verifiers: sweeps over every gold solution of the shared benchmarks, and hand-worked cases for every answer form."""
from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from decimal import Decimal

import pytest

from megatron_meml.data import load_problems
from megatron_meml.rewards import (RewardConfig, Score, answer_in_format, extract_answer, format_answer, option_letter,
                                   score_last_number, warm_up)
from megatron_meml.rewards.math_equiv import deadline, math_equal, plain_number
from megatron_meml.rewards.score import score_strict as score
from megatron_meml.types import Problem


def math_problem(answer: str) -> Problem:
    return Problem(id="m", question="q", answer=answer)


CHOICE = Problem(id="c", question="q", answer="b", kind="choice",
                 options=(("a", "38"), ("b", "27.675"), ("c", "30 %"), ("d", "data inadequate"), ("e", "rs . 1,200")))


# ---------------------------------------------------------------------------------------- benchmark sweeps
def test_gsm8k_every_gold_solution_scores_correct_and_plus_one_wrong(shared_data):
    total = 0
    for split in ("train", "test"):
        for p in load_problems("gsm8k", shared_data / f"gsm8k/{split}.jsonl"):
            raw = p.meta["raw_answer"]
            assert score(p, raw, "hash").status == "correct", p.id
            changed = raw.rsplit("####", 1)[0] + f"#### {int(p.answer) + 1}"
            assert score(p, changed, "hash").status == "wrong", p.id
            rendered = f"{p.solution}\n{format_answer(p.answer, 'the_answer_is')}"
            assert score(p, rendered, "the_answer_is").status == "correct", p.id
            total += 1
    assert total == 7473 + 1319


def _mathqa_failure_class(p: Problem, s: Score) -> str:
    if s.status == "no_answer":
        return "no option letter or option value stated in the rationale"
    return "rationale names another option (a marked value or letter that contradicts `correct`)"


@pytest.mark.parametrize("file", ["test.json", "challenge_test.json"])
def test_mathqa_gold_rationale_extraction_rate(shared_data, file):
    problems = load_problems("mathqa", shared_data / "mathqa" / file)
    scores = [score(p, p.solution, "the_answer_is") for p in problems]
    ok = sum(s.status == "correct" for s in scores)
    classes = Counter(_mathqa_failure_class(p, s) for p, s in zip(problems, scores) if s.status != "correct")
    rate = ok / len(problems)
    print(f"\nmathqa/{file}: option extracted from gold rationale == correct: {ok}/{len(problems)} = {rate:.4f}")
    for name, n in classes.most_common():
        print(f"  {n:4d}  {name}")
    assert rate >= 0.95


def test_mathqa_every_correct_letter_and_value_scores_correct(shared_data):
    problems = load_problems("mathqa", shared_data / "mathqa/test.json")
    ambiguous = 0
    for p in problems:
        for fmt in ("the_answer_is", "boxed", "hash"):
            assert score(p, f"work\n{format_answer(p.answer, fmt)}", fmt).status == "correct", p.id
        wrong_letter = next(k for k, _ in p.options if k != p.answer)
        assert score(p, format_answer(wrong_letter, "the_answer_is"), "the_answer_is").status == "wrong", p.id
        value = dict(p.options)[p.answer]
        if option_letter(value, p.options) is None:  # two options share this value: no unique letter exists
            ambiguous += 1
            continue
        assert score(p, format_answer(value, "the_answer_is"), "the_answer_is").status == "correct", (p.id, value)
    print(f"\nmathqa/test.json: {ambiguous} rows whose correct value is not unique among the options")
    assert ambiguous < 0.01 * len(problems)


def test_strategyqa_yes_no_forms_both_ways(shared_data):
    for file in ("train.json", "dev.json"):
        for p in load_problems("strategyqa", shared_data / "strategyqa" / file):
            other = "no" if p.answer == "yes" else "yes"
            for fmt in ("the_answer_is", "boxed", "hash"):
                assert score(p, format_answer(p.answer, fmt), fmt).status == "correct", p.id
                assert score(p, format_answer(other, fmt), fmt).status == "wrong", p.id
            as_bool = {"yes": "True", "no": "False"}
            assert score(p, f"The answer is {as_bool[p.answer]}.", "the_answer_is").status == "correct"
            assert score(p, f"The answer is {as_bool[other]}.", "the_answer_is").status == "wrong"


# ------------------------------------------------------------------------------------------------ math forms
@pytest.mark.parametrize("gold,response,status", [
    ("72", "The answer is 72.", "correct"),
    ("72", "so she earns $72.00 in total. The answer is $72.00.", "correct"),
    ("1080", "The answer is 1,080 dollars.", "correct"),
    ("1080", "#### 1,080", "correct"),
    ("-3", "The answer is \u22123.", "correct"),
    ("0.5", "The answer is .5", "correct"),
    ("25", "The answer is 25%.", "correct"),
    ("0.25", "The answer is 25%.", "correct"),
    ("72", "\\boxed{\\$72}", "correct"),
    ("72", "The answer is \\boxed{72}.", "correct"),
    ("72", "\\boxed{72 \\text{ dollars}}", "correct"),
    ("72", "**Answer:** 72", "correct"),
    ("72", "The answer is \\frac{144}{2}.", "correct"),
    ("\\frac{3}{4}", "The answer is 0.75", "correct"),
    ("\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}", "correct"),
    ("123456789", "The answer is 123456790.", "wrong"),
    ("72", "The answer is 73.", "wrong"),
    ("72", "I think it is 72.", "no_answer"),
    ("72", "", "no_answer"),
])
def test_math_answer_forms(gold, response, status):
    assert score(math_problem(gold), response, "the_answer_is").status == status


def test_last_match_wins_and_configured_format_first():
    p = math_problem("5")
    assert score(p, "The answer is 4. Wait, no. The answer is 5.", "the_answer_is").status == "correct"
    assert score(p, "The answer is 5. Hmm, the answer is 4.", "the_answer_is").status == "wrong"
    # the configured format beats a later marker of another format
    assert score(p, "\\boxed{5}\nThe answer is 4.", "boxed").status == "correct"
    assert score(p, "\\boxed{5}\nThe answer is 4.", "the_answer_is").status == "wrong"
    # without the configured marker, the last marker of any kind counts
    assert score(p, "The answer is 4. #### 5", "boxed").extracted == "5"


def test_extract_answer_cleaning():
    assert extract_answer("The answer is $\\frac{1}{2}$.", "the_answer_is", 4096) == "\\frac{1}{2}"
    assert extract_answer("x \\boxed{a{b}c} y \\boxed{d", "boxed", 4096) == "a{b}c"  # unbalanced last box skipped
    assert extract_answer("The answer is 3.5. Done", "the_answer_is", 4096) == "3.5"
    assert extract_answer("#### 42\n", "hash", 4096) == "42"
    assert extract_answer("The answer is 1. " + "x" * 5000, "the_answer_is", 4096) is None  # outside the tail


def test_plain_number_is_exact():
    assert plain_number("$1,234,567.50") == (Decimal("1234567.50"), False)
    assert plain_number("12 %") == (Decimal("12"), True)
    assert plain_number("x = 7") == (Decimal("7"), False)
    assert plain_number("3/4") is None and plain_number("2^10") is None and plain_number("1, 2") is None
    assert plain_number("rs.400") == (Decimal("400"), False)


def test_last_number_fallback_is_opt_in():
    p = math_problem("12")
    assert score(p, "so we get 12", "the_answer_is").status == "no_answer"
    cfg = RewardConfig(last_number_fallback=True)
    assert score(p, "first 3 then 12", "the_answer_is", cfg).status == "correct"


# ------------------------------------------------------------------------------------------------ format vs skill
@pytest.mark.parametrize("gold,response,status,extracted", [
    ("7", "She has 3 apples and 4 pears, so 7 in total.", "correct", "7"),  # right, but in no answer format
    ("7", "The answer is 7. Check: 3 + 4", "wrong", "4"),  # the format-bound verifier says correct
    ("1080", "Total: $1,080.", "correct", "1,080"),
    ("-2.5", "it falls by -2.5", "correct", "-2.5"),
    ("0.25", "25% of it, i.e. 25", "wrong", "25"),  # the last number is 25, not 25%
    ("7", "seven", "no_answer", None),
    ("7", "", "no_answer", None),
])
def test_last_number_read_out(gold, response, status, extracted):
    s = score_last_number(math_problem(gold), response)
    assert (s.status, s.extracted, s.reward) == (status, extracted, 1.0 if status == "correct" else 0.0)


def test_last_number_reads_only_the_tail_and_only_math():
    p = math_problem("5")
    assert score_last_number(p, "5 " + "x" * 100, RewardConfig(tail_chars=64)).status == "no_answer"
    with pytest.raises(ValueError, match="for math problems; problem c is 'choice'"):
        score_last_number(CHOICE, "The answer is b")


@pytest.mark.parametrize("response,fmt,ok", [
    ("so 3 + 4 = 7. The answer is 7.", "the_answer_is", True),
    ("The answer is **7**", "the_answer_is", True),
    ("#### 7", "the_answer_is", False),  # extract_answer falls back to this marker; the format check does not
    ("The answer is 7.", "hash", False),
    ("work\n#### 7", "hash", True),
    ("\\boxed{7}", "boxed", True),
    ("\\boxed{}", "boxed", False),  # a marker with nothing in it
    ("The answer is .", "the_answer_is", False),
    ("I think it is 7.", "the_answer_is", False),
])
def test_answer_in_format(response, fmt, ok):
    assert answer_in_format(response, fmt, 4096) is ok


def test_answer_in_format_reads_only_the_tail():
    assert answer_in_format("The answer is 7. " + "x" * 100, "the_answer_is", 64) is False


# ------------------------------------------------------------------------------------------------ choice / bool
@pytest.mark.parametrize("response,letter,status", [
    ("The answer is b.", "b", "correct"), ("The answer is (B).", "b", "correct"),
    ("The answer is b ) 27.675", "b", "correct"), ("The answer is option b", "b", "correct"),
    ("The answer is 27.675", "b", "correct"), ("The answer is 30%", "c", "wrong"),
    ("The answer is Data inadequate.", "d", "wrong"), ("The answer is 1200.", "e", "wrong"),
    ("so the answer : b", "b", "correct"), ("... hence d is the correct answer", "d", "wrong"),
    ("total = 27.675 . b )", "b", "correct"), ("the result is 27.675", "b", "correct"),
    ("The answer is 99", "99", "wrong"), ("no idea", None, "no_answer"),
])
def test_choice_forms(response, letter, status):
    s = score(CHOICE, response, "the_answer_is")
    assert (s.extracted, s.status) == (letter, status)


def test_option_letter_refuses_ambiguous_values():
    opts = (("a", "5"), ("b", "5.0"), ("c", "6"), ("d", "7 sec"), ("e", "7 sec"))
    assert option_letter("5", opts) == "a"  # the exact option text wins
    assert option_letter("5.00", opts) is None  # numerically equal to a and b
    assert option_letter("7 sec", opts) is None  # two options with the same text
    assert option_letter("6", opts) == "c"
    assert option_letter("a number", opts) is None


@pytest.mark.parametrize("response,status", [
    ("The answer is yes.", "correct"), ("The answer is Yes, because ...", "correct"), ("\\boxed{true}", "correct"),
    ("Answer: no", "wrong"), ("yes", "correct"), ("The answer is not clear", "wrong"), ("hmm", "no_answer"),
])
def test_bool_forms(response, status):
    p = Problem(id="b", question="q", answer="yes", kind="bool")
    assert score(p, response, "the_answer_is").status == status


# ------------------------------------------------------------------------------------------------ time limits
def test_symbolic_blowup_times_out_quickly():
    warm_up()
    t0 = time.monotonic()
    s = score(math_problem("1"), "The answer is 9^{9^{9^{9}}}", "the_answer_is", RewardConfig(timeout_s=0.3))
    assert s.status in ("timeout", "wrong")
    assert time.monotonic() - t0 < 1.0


def test_deadline_restores_an_outer_alarm():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.4)
        with deadline(0.1):
            pass
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0.2 < remaining <= 0.4
        time.sleep(0.5)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_worker_threads_are_bounded_without_signals():
    warm_up()
    out: list[tuple[Score, float]] = []

    def run():
        t0 = time.monotonic()
        s = score(math_problem("1"), "The answer is 9^{9^{9^{9}}}", "the_answer_is")
        out.append((s, time.monotonic() - t0))
        out.append((score(math_problem("\\frac{1}{2}"), "The answer is 0.5", "the_answer_is"), 0.0))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert out[0][0].status == "wrong" and out[0][1] < 1.0
    assert out[1][0].status == "correct"


def test_math_equal_caps_input():
    cfg = RewardConfig(max_answer_chars=20, max_brace_depth=3)
    assert math_equal("1", "{{{{1}}}}", cfg) is False
    assert math_equal("1", "1" + " " * 30 + "+0", cfg) is False
