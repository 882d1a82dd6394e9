"""Benchmark loaders: the shared copies load with the right fields; every bad-row case fails with one clear
error (file, line/index, field) or is skipped and counted; splits are deterministic."""
from __future__ import annotations

import json
import logging

import pytest

from megatron_meml.data import DataConfig, DataError, load_problems, load_splits, split_problems
from megatron_meml.data.benchmarks import parse_options


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ shared copies
@pytest.mark.parametrize("source,file,count", [
    ("gsm8k", "gsm8k/train.jsonl", 7473), ("gsm8k", "gsm8k/test.jsonl", 1319),
    ("mathqa", "mathqa/test.json", 2985), ("mathqa", "mathqa/challenge_test.json", 604),
    ("strategyqa", "strategyqa/train.json", 2061), ("strategyqa", "strategyqa/dev.json", 229),
])
def test_shared_copies_load_completely(shared_data, source, file, count):
    problems = load_problems(source, shared_data / file)
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    assert all(p.question and p.answer and p.source == source for p in problems)


def test_gsm8k_fields(shared_data):
    first = load_problems("gsm8k", shared_data / "gsm8k/train.jsonl")[0]
    assert first.id == "gsm8k/train/0"
    assert first.answer == "72" and first.kind == "math"
    assert first.solution.startswith("Natalia sold 48/2 = 24 clips in May.")  # calculator tag <<48/2=24>> removed
    assert "<<" not in first.solution and "####" not in first.solution
    by_raw = [p for p in load_problems("gsm8k", shared_data / "gsm8k/train.jsonl") if "#### 1,080" in p.meta["raw_answer"]]
    assert by_raw and all(p.answer == "1080" for p in by_raw)


def test_mathqa_and_strategyqa_fields(shared_data):
    mq = load_problems("mathqa", shared_data / "mathqa/test.json")[0]
    assert mq.kind == "choice" and mq.answer == "a"
    assert mq.options == (("a", "38"), ("b", "27.675"), ("c", "30"), ("d", "data inadequate"), ("e", "none of these"))
    assert mq.solution.startswith("giving no discount") and not mq.solution.startswith('"')
    sq = load_problems("strategyqa", shared_data / "strategyqa/train.json")[0]
    assert (sq.id, sq.kind, sq.answer) == ("2bc9c4f9c19c167187f2", "bool", "yes")
    assert sq.solution.startswith("Julius Caesar had three children.")


def test_parse_options_keeps_commas_inside_values():
    assert parse_options("a ) rs . 1,200 , b ) 2 : 3 , c ) none") == (("a", "rs . 1,200"), ("b", "2 : 3"), ("c", "none"))
    assert parse_options("b ) 1 , a ) 2") == ()  # letters out of order: refuse to guess


# ------------------------------------------------------------------------------------------------ bad rows
GOOD_GSM = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
BAD_CASES = [
    # (source, rows, suffix, expected substrings of the message)
    ("gsm8k", ['{"question": "x", "answer": '], ".jsonl", ["line 2", "not valid JSON"]),
    ("gsm8k", ['[1, 2]'], ".jsonl", ["line 2", "expected a JSON object"]),
    ("gsm8k", [{"answer": "#### 3"}], ".jsonl", ["line 2", "missing field 'question'"]),
    ("gsm8k", [{"question": "  ", "answer": "#### 3"}], ".jsonl", ["line 2", "field 'question' is empty"]),
    ("gsm8k", [{"question": 5, "answer": "#### 3"}], ".jsonl", ["line 2", "field 'question' must be a string"]),
    ("gsm8k", [{"question": "q", "answer": "it is 3"}], ".jsonl", ["line 2", "field 'answer'", "####"]),
    ("gsm8k", [{"question": "q", "answer": "#### three"}], ".jsonl", ["line 2", "field 'answer'", "not a number"]),
    ("mathqa", [{"Problem": "q", "Rationale": "r", "options": "38 or 40", "correct": "a"}], ".jsonl",
     ["line 2", "field 'options'"]),
    ("mathqa", [{"Problem": "q", "Rationale": "r", "options": "a ) 1 , b ) 2", "correct": "e"}], ".jsonl",
     ["line 2", "field 'correct'", "'e'"]),
    ("strategyqa", [{"question": "q", "answer": "maybe"}], ".jsonl", ["line 2", "field 'answer'", "true or false"]),
    ("jsonl", [{"question": "q"}], ".jsonl", ["line 2", "missing field 'answer'"]),
    ("jsonl", [{"question": "q", "answer": "z", "options": {"a": "1", "b": "2"}}], ".jsonl",
     ["line 2", "field 'answer'", "option letters"]),
    ("jsonl", [{"question": "q", "answer": "1", "kind": "essay"}], ".jsonl", ["line 2", "field 'kind'"]),
    ("jsonl", [{"question": "q", "answer": "perhaps", "kind": "bool"}], ".jsonl", ["line 2", "field 'answer'"]),
    ("jsonl", [{"question": "q", "answer": "1", "id": "p1"}, {"question": "r", "answer": "2", "id": "p1"}], ".jsonl",
     ["line 3", "duplicate id 'p1'", "line 2"]),
]


@pytest.mark.parametrize("source,rows,suffix,expected", BAD_CASES)
def test_bad_row_raises_one_clear_error(tmp_path, source, rows, suffix, expected):
    first = GOOD_GSM if source == "gsm8k" else {
        "mathqa": {"Problem": "p", "Rationale": "r", "options": "a ) 1 , b ) 2", "correct": "b"},
        "strategyqa": {"question": "q0", "answer": True},
        "jsonl": {"question": "q0", "answer": "0", "id": "p0"},
    }[source]
    path = write_jsonl(tmp_path / f"bad{suffix}", [first, *rows])
    with pytest.raises(DataError) as err:
        load_problems(source, path)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("source,rows,suffix,expected", BAD_CASES)
def test_skip_bad_rows_counts_logs_and_keeps_the_good(tmp_path, caplog, source, rows, suffix, expected):
    good = {"gsm8k": GOOD_GSM, "mathqa": {"Problem": "p", "Rationale": "r", "options": "a ) 1 , b ) 2", "correct": "b"},
            "strategyqa": {"question": "q0", "answer": True}, "jsonl": {"question": "q0", "answer": "0", "id": "p0"}}
    path = write_jsonl(tmp_path / f"bad{suffix}", [good[source], *rows])
    with caplog.at_level(logging.WARNING):
        problems = load_problems(source, path, skip_bad_rows=True)
    kept = 2 if rows[-1] == {"question": "r", "answer": "2", "id": "p1"} else 1  # duplicate: the first p1 stays
    assert len(problems) == kept
    assert "skipped 1 bad row(s)" in caplog.text
    assert expected[1] in caplog.text


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_problems("gsm8k", tmp_path / "nope.jsonl")
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_problems("strategyqa", tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text('[{"question": ')
    with pytest.raises(DataError, match="not valid JSON"):
        load_problems("strategyqa", tmp_path / "broken.json")
    with pytest.raises(DataError, match="no valid problems"):
        load_problems("gsm8k", write_jsonl(tmp_path / "allbad.jsonl", [{"x": 1}]), skip_bad_rows=True)
    with pytest.raises(DataError, match="data.path"):
        load_problems("jsonl")


def test_jsonl_generic_rows(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"question": "2+2?", "answer": 4, "solution": "2+2=4", "id": 7},
        {"question": "pick", "answer": "B", "options": [["a", "1"], ["b", "2"]]},
        {"question": "sky blue?", "answer": True},
        {"question": "half?", "answer": "\\frac{1}{2}", "meta": {"level": 3}},
    ])
    p = load_problems("jsonl", path)
    assert [x.id for x in p] == ["7", "mine/1", "mine/2", "mine/3"]
    assert [x.kind for x in p] == ["math", "choice", "bool", "math"]
    assert [x.answer for x in p] == ["4", "b", "yes", "\\frac{1}{2}"]
    assert p[1].options == (("a", "1"), ("b", "2")) and p[3].meta == {"level": 3}


def test_hub_without_network_is_a_clear_error():
    with pytest.raises(DataError, match="data.path"):
        load_problems("strategyqa")  # no canonical hub id and no local file


# ------------------------------------------------------------------------------------------------ splits
def _problems(n):
    from megatron_meml.types import Problem

    return [Problem(id=f"p{i}", question=f"q{i}", answer=str(i)) for i in range(n)]


def test_split_is_exact_disjoint_deterministic_and_order_free():
    items = _problems(1000)
    train, val = split_problems(items, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert not {p.id for p in train} & {p.id for p in val}
    assert split_problems(items, 0.1, seed=3) == (train, val)
    shuffled_val = split_problems(list(reversed(items)), 0.1, seed=3)[1]
    assert {p.id for p in shuffled_val} == {p.id for p in val}
    assert {p.id for p in split_problems(items, 0.1, seed=4)[1]} != {p.id for p in val}
    assert [int(p.id[1:]) for p in train] == sorted(int(p.id[1:]) for p in train)  # input order kept
    assert split_problems(items, 0.0, seed=3) == (items, [])


def test_load_splits_from_config(tmp_path, shared_data):
    cfg = DataConfig(source="gsm8k", path=str(shared_data / "gsm8k/test.jsonl"), val_fraction=0.25, max_problems=50)
    splits = load_splits(cfg, seed=0)
    train, val = splits.train, splits.test
    assert len(train) == 50 and len(val) == round(1319 * 0.25)
    cfg2 = DataConfig(source="gsm8k", path=str(shared_data / "gsm8k/train.jsonl"),
                      eval_path=str(shared_data / "gsm8k/test.jsonl"))
    splits2 = load_splits(cfg2, seed=0)
    train2, val2 = splits2.train, splits2.test
    assert (len(train2), len(val2)) == (7473, 1319)
    assert val2[0].id == "gsm8k/test/0"


def test_dev_slice_of_the_held_out_problems(shared_data):
    """Sources without a stream of their own take the dev problems out of the held-out split: by a hash of (seed,
    id), so the slice is the same whatever the row order, and no problem is in two splits."""
    kw = dict(source="gsm8k", path=str(shared_data / "gsm8k/test.jsonl"), val_fraction=0.25)
    plain = load_splits(DataConfig(**kw), seed=0)
    split = load_splits(DataConfig(**kw, dev_size=50), seed=0)
    assert split.train == plain.train and len(split.dev) == 50 and len(split.test) == len(plain.test) - 50
    ids = [{p.id for p in part} for part in (split.train, split.test, split.dev)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[1] | ids[2] == {p.id for p in plain.test}
    assert [p.id for p in split.test] == [p.id for p in plain.test if p.id in ids[1]]  # order kept
    assert load_splits(DataConfig(**kw, dev_size=50), seed=0) == split
    from megatron_meml.data.loaders import dev_slice

    assert {p.id for p in dev_slice(plain.test[::-1], 50, seed=0)[1]} == ids[2]
    assert {p.id for p in dev_slice(plain.test, 50, seed=1)[1]} != ids[2]
    with pytest.raises(DataError, match="data.dev_size=330 leaves no test problems"):
        load_splits(DataConfig(**kw, dev_size=330), seed=0)


@pytest.mark.parametrize("kwargs,field", [
    ({"source": "csv"}, "data.source"), ({"val_fraction": 1.0}, "data.val_fraction"),
    ({"synthetic_levels": [1, 2], "synthetic_weights": [1.0]}, "data.synthetic_levels"),
    ({"synthetic_levels": [0], "synthetic_weights": [1.0]}, "data.synthetic_levels"),
    ({"dev_size": -1}, "data.dev_size"),
    ({"synthetic_weights": [0.0, 0.0, 0.0]}, "data.synthetic_weights"),
    ({"synthetic_ops": ["div"]}, "data.synthetic_ops"), ({"synthetic_size": 0}, "data.synthetic_size"),
    ({"max_problems": 0}, "data.max_problems"),
])
def test_data_config_checks_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)
