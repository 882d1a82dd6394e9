"""Row parsers for the benchmarks (GSM8K, MathQA, StrategyQA, generic JSONL) and hub access.

Each ``parse_<source>(ref, row, split)`` turns one validated raw row into a :class:`Problem` or raises a
:class:`DataError` naming the row and field. Hub rows (``datasets``) carry the same fields as the local
files, so they go through the same parsers.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

from megatron_meml.data.rows import DataError, RowRef, opt, req_str
from megatron_meml.types import KINDS, Problem

HUB_IDS = {"gsm8k": ("openai/gsm8k", "main"), "mathqa": ("allenai/math_qa", None), "strategyqa": (None, None)}
"""Default hub dataset id and config per source (StrategyQA has no canonical hub copy: pass data.hub_id)."""

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_CALC_TAG = re.compile(r"<<[^<>]*>>")
_OPTION = re.compile(r"(?:^|,)\s*([a-eA-E])\s*\)\s*")
_TRUE = ("yes", "true")
_FALSE = ("no", "false")


# ---------------------------------------------------------------------------------------------- gsm8k
def parse_gsm8k(ref: RowRef, row: dict, split: str) -> Problem:
    """``{"question", "answer": "...reasoning...\\n#### 1,080"}`` -> math problem with answer ``1080``."""
    question = req_str(ref, row, "question")
    text = req_str(ref, row, "answer")
    if "####" not in text:
        raise DataError(f"{ref.where()}: field 'answer' has no final '#### <number>' line")
    reasoning, final = text.rsplit("####", 1)
    final = final.strip()
    if not _NUMBER.fullmatch(final):
        raise DataError(f"{ref.where()}: field 'answer': '#### {final[:40]}' is not a number")
    solution = _CALC_TAG.sub("", reasoning).strip()
    return Problem(id=f"gsm8k/{split}/{ref.index}", question=question.strip(), answer=final.replace(",", ""),
                   solution=solution, kind="math", source="gsm8k", meta={"raw_answer": text})


# ---------------------------------------------------------------------------------------------- mathqa
def parse_options(text: str) -> tuple[tuple[str, str], ...]:
    """``"a ) 38 , b ) 27.675 , c ) 30"`` -> ``(("a", "38"), ("b", "27.675"), ("c", "30"))``; () if unparseable.

    Letters must run a, b, c, ... in order (a value containing ", x )" cannot be split unambiguously).
    """
    marks = list(_OPTION.finditer(text))
    letters = [m.group(1).lower() for m in marks]
    if not marks or letters != [chr(ord("a") + i) for i in range(len(marks))]:
        return ()
    out = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        value = text[m.end(): nxt.start() if nxt is not None else len(text)].strip().rstrip(",").strip()
        out.append((m.group(1).lower(), value))
    return tuple(out)


def _options_field(ref: RowRef, row: dict, key: str) -> tuple[tuple[str, str], ...]:
    raw = row.get(key)
    if raw is None:
        raise DataError(f"{ref.where()}: missing field '{key}'")
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        raw = " , ".join(raw)
    if isinstance(raw, str):
        options = parse_options(raw)
        if not options:
            raise DataError(f"{ref.where()}: field '{key}' is not of the form 'a ) ... , b ) ...': {raw[:60]!r}")
        return options
    if isinstance(raw, dict) and all(isinstance(v, (str, int, float)) for v in raw.values()):
        return tuple((str(k).strip().lower(), str(v)) for k, v in raw.items())
    if isinstance(raw, list) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in raw):
        return tuple((str(k).strip().lower(), str(v)) for k, v in raw)
    raise DataError(f"{ref.where()}: field '{key}' must be a string 'a ) .. , b ) ..', a list or a mapping")


def parse_mathqa(ref: RowRef, row: dict, split: str) -> Problem:
    """``{"Problem", "Rationale", "options", "correct"}`` -> choice problem whose answer is the option letter."""
    question = req_str(ref, row, "Problem")
    rationale = req_str(ref, row, "Rationale", allow_empty=True).strip().strip('"').strip()
    options = _options_field(ref, row, "options")
    correct = req_str(ref, row, "correct").strip().lower()
    if correct not in {k for k, _ in options}:
        raise DataError(f"{ref.where()}: field 'correct' = '{correct}' is not one of the option letters "
                        f"{[k for k, _ in options]}")
    meta = {k: row[k] for k in ("category", "annotated_formula") if isinstance(row.get(k), str)}
    return Problem(id=f"mathqa/{split}/{ref.index}", question=question.strip(), answer=correct,
                   solution=rationale, kind="choice", options=options, source="mathqa", meta=meta)


# ---------------------------------------------------------------------------------------------- strategyqa
def parse_strategyqa(ref: RowRef, row: dict, split: str) -> Problem:
    """``{"qid", "question", "answer": bool, "facts", "decomposition"}`` -> bool problem, answer yes/no."""
    question = req_str(ref, row, "question")
    answer = row.get("answer")
    if not isinstance(answer, bool):
        raise DataError(f"{ref.where()}: field 'answer' must be true or false, got {answer!r}"[:200])
    facts = opt(ref, row, "facts", (list,), [])
    if not all(isinstance(f, str) for f in facts):
        raise DataError(f"{ref.where()}: field 'facts' must be a list of strings")
    decomposition = opt(ref, row, "decomposition", (list,), [])
    qid = opt(ref, row, "qid", (str,), "") or f"strategyqa/{split}/{ref.index}"
    meta = {"decomposition": [str(d) for d in decomposition], "term": row.get("term")}
    return Problem(id=qid, question=question.strip(), answer="yes" if answer else "no",
                   solution=" ".join(f.strip() for f in facts), kind="bool", source="strategyqa", meta=meta)


# ---------------------------------------------------------------------------------------------- generic jsonl
def _bool_answer(ref: RowRef, value: Any) -> str:
    text = str(value).strip().lower()
    if text in _TRUE:
        return "yes"
    if text in _FALSE:
        return "no"
    raise DataError(f"{ref.where()}: field 'answer' must be yes/no/true/false for kind 'bool', got {value!r}"[:200])


def parse_jsonl(ref: RowRef, row: dict, split: str) -> Problem:
    """``{"question", "answer", "solution"?, "kind"?, "options"?, "id"?, "meta"?}`` -> Problem.

    ``kind`` defaults to bool for a JSON boolean answer, choice when options are given, else math.
    """
    question = req_str(ref, row, "question")
    if row.get("answer") is None:
        raise DataError(f"{ref.where()}: missing field 'answer'")
    raw_answer = row["answer"]
    if not isinstance(raw_answer, (str, int, float, bool)):
        raise DataError(f"{ref.where()}: field 'answer' must be a string, number or boolean")
    default_kind = "bool" if isinstance(raw_answer, bool) else "choice" if row.get("options") is not None else "math"
    kind = opt(ref, row, "kind", (str,), default_kind)
    if kind not in KINDS:
        raise DataError(f"{ref.where()}: field 'kind' must be one of {KINDS}, got '{kind}'")
    options: tuple[tuple[str, str], ...] = ()
    if kind == "bool":
        answer = _bool_answer(ref, raw_answer)
    elif kind == "choice":
        options = _options_field(ref, row, "options")
        answer = str(raw_answer).strip().lower()
        if answer not in {k for k, _ in options}:
            raise DataError(f"{ref.where()}: field 'answer' = '{answer}' is not one of the option letters "
                            f"{[k for k, _ in options]}")
    else:
        answer = str(raw_answer).strip()
        if not answer or isinstance(raw_answer, bool):
            raise DataError(f"{ref.where()}: field 'answer' must be a non-empty number or expression for kind 'math'")
    solution = opt(ref, row, "solution", (str,), "")
    rid = opt(ref, row, "id", (str, int), None)
    meta = opt(ref, row, "meta", (dict,), {})
    return Problem(id=str(rid) if rid is not None else f"{split}/{ref.index}", question=question.strip(),
                   answer=answer, solution=solution, kind=kind, options=options, source=f"jsonl:{split}", meta=meta)


PARSERS = {"gsm8k": parse_gsm8k, "mathqa": parse_mathqa, "strategyqa": parse_strategyqa, "jsonl": parse_jsonl}


# ---------------------------------------------------------------------------------------------- hub
def hub_rows(source: str, hub_id: str | None, split: str) -> Iterator[tuple[RowRef, Any]]:
    """Rows of a hub dataset through ``datasets`` (only used when no local path is given)."""
    default_id, config = HUB_IDS.get(source, (None, None))
    name = hub_id or default_id
    if name is None:
        raise DataError(f"data.source={source}: no local file given (data.path) and no hub id (data.hub_id)")
    try:
        import datasets  # only for hub loads (seconds to import); local files never need it

        ds = datasets.load_dataset(name, config, split=split) if config else datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, missing split: all user-fixable, all reported the same way
        raise DataError(f"could not load hub dataset '{name}' (config {config}, split '{split}'): "
                        f"{type(e).__name__}: {str(e)[:300]}. Without network access pass a local file "
                        f"with data.path") from None
    where = f"hub:{name}[{split}]"
    for i, row in enumerate(ds):
        yield RowRef(file=where, index=i), dict(row)
