"""`meml traces` without an engine: config checks, the several-traces-per-id reader and MEF joiner, the selection of
kept traces, the commit/resume mechanics of the trace files, and the user errors of the command."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from megatron_meml.cli import main as meml
from megatron_meml.data.charset import char_tokenizer
from megatron_meml.data.rows import DataError
from megatron_meml.experts.config import ExpertsConfig
from megatron_meml.experts.expert_set import ExpertSet, load_experts, load_teacher_traces, read_teacher_traces, vocab_texts
from megatron_meml.rewards.config import RewardConfig
from megatron_meml.stages.traces import TracesConfig, TracesError, select_traces
from megatron_meml.stages.traces_store import ExpertTally, TraceStore
from megatron_meml.types import Completion, Problem
from tests.tiny_hf import make_tiny_hf

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = str(REPO / "recipes" / "embedded-default.yaml")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,message", [
    ({"samples_per_expert": 0}, "traces.samples_per_expert must be >= 1"),
    ({"keep_per_problem": 0}, "traces.keep_per_problem must be >= 1"),
    ({"chunk_size": 0}, "traces.chunk_size must be >= 1"),
    ({"max_new_tokens": -1}, "traces.max_new_tokens must be >= 0"),
    ({"max_problems": -1}, "traces.max_problems must be >= 0"),
    ({"max_chunks": -2}, "traces.max_chunks must be >= 0"),
    ({"samples_per_expert": 2, "keep_per_problem": 3}, r"traces.keep_per_problem \(3\) must be <="),
    ({"temperature": -0.5}, "traces.temperature must be >= 0"),
    ({"temperature": 0.0}, "traces.temperature=0 .* traces.samples_per_expert=1, got 8"),
    ({"top_p": 0.0}, r"traces.top_p must be in \(0, 1\]"),
    ({"experts": []}, "traces.experts must be null or a non-empty list"),
    ({"experts": ["a", "a"]}, "traces.experts must be null or a non-empty list without duplicates"),
    ({"teacher_path": " "}, "traces.teacher_path must be null or a path"),
])
def test_config_checks_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TracesConfig(**kwargs)


def test_config_defaults_and_greedy():
    assert TracesConfig().keep_per_problem == 1 and TracesConfig().experts is None
    assert TracesConfig(temperature=0.0, samples_per_expert=1, keep_per_problem=1).temperature == 0.0


# ----------------------------------------------------------------------------------------------- reader / joiner
def test_reader_keeps_several_samples_per_id_and_old_files_still_read(tmp_path):
    multi = _write(tmp_path / "m.jsonl", [{"id": "a", "response": "x0", "sample": 0},
                                          {"id": "b", "response": "y", "sample": 3},
                                          {"id": "a", "response": "x2", "sample": 2}])
    assert read_teacher_traces(multi) == {"a": ["x0", "x2"], "b": ["y"]}
    with pytest.raises(DataError, match="id 'a' has 2 traces"):
        load_teacher_traces(multi)
    old = _write(tmp_path / "o.jsonl", [{"id": "a", "response": "x"}, {"id": 7, "response": "z"}])
    assert read_teacher_traces(old) == {"a": ["x"], "7": ["z"]} and load_teacher_traces(old) == {"a": "x", "7": "z"}


@pytest.mark.parametrize("rows,message", [
    ([{"id": "a", "response": "x"}, {"id": "a", "response": "y"}], r"line 2: field 'id': duplicate id 'a'"),
    ([{"id": "a", "response": "x"}, {"id": "a", "response": "y", "sample": 1}], r"line 2: field 'id': duplicate"),
    ([{"id": "a", "response": "x", "sample": 1}, {"id": "a", "response": "y"}], r"line 2: field 'id': duplicate"),
    ([{"id": "a", "response": "x", "sample": 1}, {"id": "a", "response": "y", "sample": 1}],
     r"line 2: field 'sample': duplicate sample 1 for id 'a'"),
    ([{"id": "a", "response": "x", "sample": "1"}], r"line 1: field 'sample' must be int"),
    ([{"id": "a", "response": "x", "sample": True}], r"line 1: field 'sample' must be int"),
    ([{"id": "a", "response": "x", "sample": -1}], r"line 1: field 'sample' must be >= 0"),
])
def test_reader_errors_name_line_and_field(tmp_path, rows, message):
    path = _write(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=message):
        read_teacher_traces(path)
    assert read_teacher_traces(path, skip_bad_rows=True) == ({"a": ["x"]} if len(rows) == 2 else {})


def test_mef_joins_several_traces_per_problem(tmp_path):
    problems = [Problem(id=f"q{i}", question=f"{i}+{i}", answer=str(2 * i), solution=f"{i}+{i}={2 * i}")
                for i in range(3)]
    traces = _write(tmp_path / "e1.jsonl", [{"id": "q0", "response": "t0a", "sample": 0},
                                            {"id": "q0", "response": "t0b\n", "sample": 4},
                                            {"id": "q2", "response": "t2", "sample": 1},
                                            {"id": "zz", "response": "tz", "sample": 0}])
    cfg = ExpertsConfig(ids=["expert0", "expert1", "expert2"], answer_format="hash",
                        teacher_traces={"expert1": str(traces)})
    tok = char_tokenizer(["".join(vocab_texts(load_experts(cfg, 3), cfg)), "0123456789+=tzab"])
    es = ExpertSet.from_config(cfg, 3, tok)
    rows, reports = es.mef_examples(problems, traces={"expert2": {"q1": "s1", "q2": ["s2a", "s2b"]}})
    got = [(r.expert, r.problem_id, tok.decode(r.tokens[r.prompt_len:], skip_special_tokens=True)) for r in rows]
    assert got[3:] == [(1, "q0", "t0a"), (1, "q0", "t0b"), (1, "q2", "t2"),
                       (2, "q1", "s1"), (2, "q2", "s2a"), (2, "q2", "s2b")]
    r1, r2 = reports
    assert (r1.matched, r1.traces, r1.missing_ids, r1.extra_ids) == (2, 3, ["q1"], ["zz"])
    assert (r2.matched, r2.traces, r2.missing_ids) == (2, 3, ["q0"])
    assert r1.summary().startswith("expert expert1: 3 traces for 2 problems joined from")


# ----------------------------------------------------------------------------------------------- selection
def _c(text: str, finish: str = "stop") -> Completion:
    return Completion(prompt_ids=[1], token_ids=[2], text=text, logprobs=[-0.1], finish_reason=finish)


def test_select_keeps_the_first_distinct_finished_correct_ones():
    p = Problem(id="p", question="?", answer="7")
    outs = [_c("#### 5"), _c("#### 7", "length"), _c("#### 7"), _c("#### 7  \n"), _c("no idea"), _c("x #### 7"),
            _c("y #### 7")]
    cfg = TracesConfig(samples_per_expert=7, keep_per_problem=2)
    kept, samples, tally = select_traces(p, outs, cfg, "hash", RewardConfig())
    assert kept == [{"id": "p", "response": "#### 7", "sample": 2}, {"id": "p", "response": "x #### 7", "sample": 5}]
    assert [s["status"] for s in samples] == ["wrong", "correct", "correct", "correct", "no_answer", "correct",
                                              "correct"]
    assert [s["kept"] for s in samples] == [False, False, True, False, False, True, False]
    assert (tally.problems, tally.samples_drawn, tally.correct, tally.traces_kept, tally.problems_with_trace,
            tally.dropped_truncated, tally.dropped_duplicate) == (1, 7, 5, 2, 1, 1, 1)
    assert tally.statuses == {"correct": 5, "wrong": 1, "no_answer": 1, "timeout": 0}
    assert tally.yield_ == pytest.approx(5 / 7)
    kept, _, _ = select_traces(p, outs[:3], TracesConfig(keep_per_problem=3, require_stop=False), "hash",
                               RewardConfig())
    assert [k["sample"] for k in kept] == [1]  # "#### 7" cut at max_new_tokens is kept; sample 2 equals it
    kept, _, tally = select_traces(p, [_c("#### 5"), _c("")], cfg, "hash", RewardConfig())
    assert kept == [] and tally.problems_with_trace == 0 and tally.yield_ == 0.0


# ----------------------------------------------------------------------------------------------- commit / resume
def _tally(kept: int) -> ExpertTally:
    return ExpertTally(problems=1, samples_drawn=2, correct=kept, traces_kept=kept, problems_with_trace=int(kept > 0))


def test_store_commits_chunks_and_resume_drops_rows_after_the_last_commit(tmp_path):
    fp = {"seed": 1, "samples_per_expert": 2}
    out = tmp_path / "out"
    store = TraceStore.open(out, ["e1"], num_chunks=3, save_samples=True, fingerprint=fp)
    assert store.chunks_done == 0 and (out / "e1.jsonl").read_bytes() == b"" and (out / "samples/e1.jsonl").exists()
    store.append_chunk({"e1": [{"id": "a", "response": "r", "sample": 1}]}, {"e1": [{"id": "a", "sample": 1}]},
                       {"e1": _tally(1)}, fp)
    committed = (out / "e1.jsonl").read_bytes()
    assert json.loads(committed) == {"id": "a", "response": "r", "sample": 1}
    with (out / "e1.jsonl").open("ab") as f:  # a crash after appending chunk 2, before its commit
        f.write(b'{"id": "b", "response": "r", "sample": 0}\n{"id": "c"')
    again = TraceStore.open(out, ["e1"], num_chunks=3, save_samples=True, fingerprint=fp)
    assert again.chunks_done == 1 and (out / "e1.jsonl").read_bytes() == committed
    assert again.tallies["e1"].as_dict() == _tally(1).as_dict() and not again.complete
    with pytest.raises(TracesError, match=r"other settings \(samples_per_expert: 2 -> 4\)"):
        TraceStore.open(out, ["e1"], num_chunks=3, save_samples=True, fingerprint={**fp, "samples_per_expert": 4})
    (out / "e1.jsonl").write_bytes(b"")
    with pytest.raises(TracesError, match="shorter than the .* bytes progress.json committed"):
        TraceStore.open(out, ["e1"], num_chunks=3, save_samples=True, fingerprint=fp)


def test_store_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "e1.jsonl").write_text('{"id": "a", "response": "mine"}\n')
    with pytest.raises(TracesError, match="holds .*e1.jsonl but no progress.json"):
        TraceStore.open(tmp_path, ["e1"], num_chunks=1, save_samples=False, fingerprint={})
    assert (tmp_path / "e1.jsonl").read_text() == '{"id": "a", "response": "mine"}\n'
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(TracesError, match="not a readable progress file"):
        TraceStore.open(tmp_path, ["e1"], num_chunks=1, save_samples=False, fingerprint={})


def test_sigterm_asks_for_a_stop_and_the_old_handler_comes_back():
    from megatron_meml.stages.traces import _StopFlag

    before = signal.getsignal(signal.SIGTERM)
    with _StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill returns
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------------------------- user errors
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    make_tiny_hf(path)
    return path


def test_command_errors_are_one_line_naming_the_key(tmp_path, tiny_teacher, capsys):
    no_weights = tmp_path / "cfg_only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    cases = [
        ([], "no teacher model: set traces.teacher_path"),
        (["model.megatron_path=/ckpt/final_model"], re.escape("export it (`meml export RUN_DIR --out DIR`)")),
        ([f"traces.teacher_path={tmp_path}"], f"traces.teacher_path={tmp_path}: no config.json"),
        ([f"model.hf_path={no_weights}"], "model.hf_path=.*no \\*.safetensors weights"),
        ([f"traces.teacher_path={tiny_teacher}"], "every active expert .* learns the gold solutions"),
        ([f"traces.teacher_path={tiny_teacher}", "experts.ids=[expert0,expert1,expert2]", "traces.experts=[expert0]"],
         "'expert0' learns the gold solutions in MEF"),
        ([f"traces.teacher_path={tiny_teacher}", "experts.ids=[expert0,expert1,expert2]", "traces.experts=[expert3]"],
         "'expert3' is not an active expert"),
        (["traces.chunk_size=0"], "traces.chunk_size must be >= 1"),
    ]
    for overrides, message in cases:
        assert meml(["traces", EMBEDDED, *overrides, f"output_dir={tmp_path / 'runs'}"]) == 2, overrides
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("meml traces: ") and re.search(message, err), (overrides, err)
    assert not (tmp_path / "runs").exists()  # nothing was written
