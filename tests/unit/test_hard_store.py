"""Hard-example store: admission, capacity, retirement, dedup, SFT draws, persistence (hand-worked sequences)."""
from __future__ import annotations

import hashlib
import json
import os
import random

import pytest

from megatron_meml.hard_examples import HardExampleConfig, HardExampleStore, StoreCorruptError, uniform
from megatron_meml.hard_examples import persist
from megatron_meml.types import ExpertGroup, Problem


def grp(pid: str, expert: int, wrong: int, g: int = 8) -> ExpertGroup:
    p = Problem(id=pid, question=f"What is {pid}?", answer="42", solution=f"Work for {pid}. The answer is 42.")
    return ExpertGroup(problem=p, expert=expert, completions=[], rewards=[0.0] * wrong + [1.0] * (g - wrong))


def cfg(**kw) -> HardExampleConfig:
    base = dict(k_wrong=6, admit_prob=1.0, capacity=3, max_replays=2)
    return HardExampleConfig(**{**base, **kw})


def keys(store: HardExampleStore) -> list[tuple[str, int]]:
    return sorted(store.entries)


def ref_uniform(seed, purpose, step, pid, expert) -> float:
    digest = hashlib.blake2b(f"{seed}\x1f{purpose}\x1f{step}\x1f{pid}\x1f{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def test_hand_worked_sequence():
    s = HardExampleStore(cfg(), None, seed=1)
    m = s.update([grp("p1", 0, 8), grp("p1", 1, 6), grp("p2", 0, 7)], step=0)
    assert keys(s) == [("p1", 0), ("p2", 0)]              # 6 wrong of 8 is not "more than 6"
    assert (m["hard/admissions"], m["hard/size"], m["hard/sft_due"]) == (2, 2, 0)

    m = s.update([grp("p1", 0, 8), grp("p3", 2, 8)], step=1)
    assert (m["hard/admissions"], m["hard/duplicates"], m["hard/size"], m["hard/sft_due"]) == (1, 1, 3, 1)
    assert {e.key for e in s.sft_batch(0, 1)} == {("p1", 0), ("p2", 0), ("p3", 2)}
    m = s.record_replay()
    assert (m["hard/replays"], m["hard/retirements"]) == (3, 0)
    assert all(e.replays == 1 for e in s.examples())

    m = s.update([grp("p2", 0, 5), grp("p4", 1, 8)], step=2)   # p2/0 solved (5 <= 6 wrong) -> retires
    assert (m["hard/retired_solved"], m["hard/admissions"]) == (1, 1)
    assert keys(s) == [("p1", 0), ("p3", 2), ("p4", 1)]
    m = s.record_replay()                                       # p1/0, p3/2 reach max_replays=2
    assert (m["hard/replays"], m["hard/retired_max_replays"], m["hard/retirements"]) == (3, 2, 3)
    assert keys(s) == [("p4", 1)] and s.entries[("p4", 1)].replays == 1
    assert m["hard/mean_age"] == 0.0 and m["hard/expert/1/size"] == 1

    m = s.update([grp("p4", 1, 8), grp("p2", 0, 8)], step=3)   # a retired key may come back
    assert keys(s) == [("p2", 0), ("p4", 1)] and s.entries[("p2", 0)].admitted_step == 3
    assert m["hard/mean_age"] == 0.5 and m["hard/expert/0/size"] == 1 and m["hard/expert/1/size"] == 1
    assert {k: m[f"hard/{k}_total"] for k in ("admissions", "duplicates", "retired_solved",
                                               "retired_max_replays", "replays")} == {
        "admissions": 5, "duplicates": 2, "retired_solved": 1, "retired_max_replays": 2, "replays": 6}


def test_entry_keeps_what_sft_needs():
    s = HardExampleStore(cfg(), None, seed=1)
    s.update([grp("p1", 2, 7)], step=4)
    (e,) = s.examples()
    assert (e.problem_id, e.expert, e.question, e.answer, e.wrong, e.group_size, e.admitted_step) == (
        "p1", 2, "What is p1?", "42", 7, 8, 4)
    assert e.target == "Work for p1. The answer is 42." and e.to_problem().id == "p1"


def test_uniform_matches_plain_hash():
    for args in [(0, "admit", 0, "a", 0), (1234, "draw", 17, "gsm8k/99", 2)]:
        assert uniform(*args) == ref_uniform(*args)


def test_admission_probability_k_wrong_over_g():
    s = HardExampleStore(HardExampleConfig(capacity=10_000), None, seed=5)  # paper: k_wrong=6, p = 6/8
    groups = [grp(f"q{i}", i % 3, 8 if i % 2 else 7) for i in range(2000)]
    s.update(groups + [grp("never", 0, 6)], step=3)
    expected = {(g.problem.id, g.expert) for g in groups if ref_uniform(5, "admit", 3, g.problem.id, g.expert) < 0.75}
    assert set(s.entries) == expected
    assert 0.72 < len(expected) / 2000 < 0.78


def test_capacity_admits_lowest_hash_then_rejects():
    s = HardExampleStore(cfg(capacity=4), None, seed=9)
    groups = [grp(f"c{i}", 0, 8) for i in range(10)]
    m = s.update(groups, step=0)
    by_hash = sorted(groups, key=lambda g: ref_uniform(9, "admit", 0, g.problem.id, 0))
    assert keys(s) == sorted((g.problem.id, 0) for g in by_hash[:4])
    assert (m["hard/admissions"], m["hard/rejected_full"], m["hard/size"]) == (4, 6, 4)
    m = s.update([grp("late", 0, 8)], step=1)
    assert (m["hard/admissions"], m["hard/rejected_full"]) == (0, 1)


def test_dedup_within_and_across_steps():
    s = HardExampleStore(cfg(capacity=8), None, seed=0)
    m = s.update([grp("d", 0, 8), grp("d", 0, 7), grp("d", 1, 8)], step=0)
    assert keys(s) == [("d", 0), ("d", 1)] and m["hard/duplicates"] == 1
    assert s.entries[("d", 0)].wrong in (7, 8)
    m = s.update([grp("d", 0, 8)], step=1)
    assert m["hard/duplicates"] == 1 and s.entries[("d", 0)].admitted_step == 0


def test_retire_needs_a_later_rollout_and_min_correct():
    s = HardExampleStore(cfg(capacity=8, retire_min_correct=1), None, seed=0)
    s.update([grp("r", 0, 7)], step=0)                      # 1 correct: hard, admitted, not retired this step
    assert keys(s) == [("r", 0)]
    m = s.update([grp("r", 0, 8), grp("r", 0, 7)], step=1)  # one of the groups has a correct answer
    assert m["hard/retired_solved"] == 1 and keys(s) == []


def test_results_do_not_depend_on_call_order():
    groups = [grp(f"o{i}", i % 3, 7 + i % 2) for i in range(40)] + [grp("o1", 1, 2)]
    a = HardExampleStore(HardExampleConfig(capacity=12), None, seed=3)
    b = HardExampleStore(HardExampleConfig(capacity=12), None, seed=3)
    for step in range(3):
        shuffled = groups[:]
        random.Random(step).shuffle(shuffled)
        a.update(groups, step)
        b.update(shuffled, step)
        assert a.state_dict() == b.state_dict()


def test_sft_batch_is_a_deterministic_even_split():
    s = HardExampleStore(cfg(capacity=6), None, seed=2)
    s.update([grp(f"b{i}", 0, 8) for i in range(6)], step=0)
    whole = s.sft_batch(0, 1)
    halves = s.sft_batch(0, 2) + s.sft_batch(1, 2)
    thirds = [s.sft_batch(r, 3) for r in range(3)]
    assert [e.key for e in halves] == [e.key for e in whole] and all(len(t) == 2 for t in thirds)
    assert [e.key for e in whole] == sorted(s.entries, key=lambda k: (ref_uniform(2, "draw", 0, *k), k))
    with pytest.raises(ValueError, match="hard_examples.capacity"):
        s.sft_batch(0, 4)
    assert HardExampleStore(cfg(capacity=6), None, seed=2).sft_batch(0, 2) == []


def test_misuse_raises():
    s = HardExampleStore(cfg(), None, seed=0)
    s.update([grp("m", 0, 8)], step=5)
    with pytest.raises(ValueError, match="step 5 is not after"):
        s.update([], step=5)
    with pytest.raises(RuntimeError, match="no SFT batch is due"):
        s.record_replay()
    s.update([grp("n", 0, 8), grp("o", 0, 8)], step=6)
    s.record_replay()
    with pytest.raises(RuntimeError, match="already recorded"):
        s.record_replay()
    with pytest.raises(ValueError, match="commit"):
        s.commit()
    with pytest.raises(ValueError, match="hard_examples.admit_prob"):
        HardExampleConfig(admit_prob=1.5)


def _filled(directory, steps: int = 4) -> HardExampleStore:
    s = HardExampleStore(cfg(capacity=6), directory, seed=11)
    for step in range(steps):
        s.update([grp(f"f{step}-{i}", i % 2, 8 - i % 2) for i in range(3)], step)
        if s.sft_due:
            s.record_replay()
        if directory is not None:
            s.commit()
    return s


def test_commit_and_reopen_restore_exactly(tmp_path):
    s = _filled(tmp_path / "store")
    back = HardExampleStore(cfg(capacity=6), tmp_path / "store", seed=11)
    assert back.state_dict() == s.state_dict() and back.step == 3
    files = sorted(os.listdir(tmp_path / "store"))
    assert files == [persist.MANIFEST, "gen-00000004.rank-00000.jsonl"]  # superseded generations removed
    copy = HardExampleStore(cfg(capacity=6), None, seed=11)
    copy.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert copy.state_dict() == s.state_dict()
    s.save(tmp_path / "ckpt")
    other = HardExampleStore(cfg(capacity=6), None, seed=11)
    other.load(tmp_path / "ckpt")
    assert other.state_dict() == s.state_dict()


def test_text_with_unicode_line_breaks_round_trips(tmp_path):
    s = HardExampleStore(cfg(), tmp_path / "s", seed=0)
    p = Problem(id="u\u2028", question="line\u2028sep\x85nel\r\nwin \u00e3 \u2014", answer="1", solution="a\nb")
    s.update([ExpertGroup(problem=p, expert=0, completions=[], rewards=[0.0] * 8)], step=0)
    s.commit()
    assert HardExampleStore(cfg(), tmp_path / "s", seed=0).state_dict() == s.state_dict()


def test_seed_from_another_jobs_store(tmp_path):
    s = _filled(tmp_path / "old")
    new = HardExampleStore(cfg(capacity=6, seed_from=str(tmp_path / "old")), tmp_path / "new", seed=1)
    assert set(new.entries) == set(s.entries)
    assert all(e.admitted_step == -1 and e.replays == 0 for e in new.examples()) and new.step == -1
    new.update([grp("fresh", 0, 8)], step=0)
    new.commit()
    again = HardExampleStore(cfg(capacity=6, seed_from=str(tmp_path / "old")), tmp_path / "new", seed=1)
    assert again.state_dict() == new.state_dict()          # its own commit wins over seeding again
    with pytest.raises(FileNotFoundError, match="seed_from"):
        HardExampleStore(cfg(seed_from=str(tmp_path / "nothing")), tmp_path / "new2", seed=1)


def test_flipped_byte_in_shard_names_the_file(tmp_path):
    _filled(tmp_path / "s")
    (shard,) = [p for p in (tmp_path / "s").iterdir() if p.suffix == ".jsonl"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=shard.name + ".*checksum mismatch"):
        HardExampleStore(cfg(capacity=6), tmp_path / "s", seed=11)


def test_damaged_manifest_and_missing_shard_name_the_file(tmp_path):
    _filled(tmp_path / "s")
    manifest = tmp_path / "s" / persist.MANIFEST
    good = manifest.read_bytes()
    manifest.write_bytes(good.replace(b'"step": 3', b'"step": 4'))
    with pytest.raises(StoreCorruptError, match="MANIFEST.json: manifest checksum mismatch"):
        HardExampleStore(cfg(capacity=6), tmp_path / "s", seed=11)
    manifest.write_bytes(good)
    next((tmp_path / "s").glob("gen-*.jsonl")).unlink()
    with pytest.raises(StoreCorruptError, match="gen-00000004.rank-00000.jsonl: listed in .* but missing"):
        HardExampleStore(cfg(capacity=6), tmp_path / "s", seed=11)


class _Crash(Exception):
    pass


def test_failure_at_every_step_of_a_commit_leaves_old_or_new(tmp_path, monkeypatch):
    """Interrupt a commit at each fsync / rename in turn: reopening gives the old or the new state, no leftovers."""
    old = _filled(None, steps=3).state_dict()
    s = HardExampleStore(cfg(capacity=6), None, seed=11)
    s.load_state_dict(old)
    s.update([grp("new", 0, 8)], step=3)
    new = s.state_dict()
    real = {name: getattr(os, name) for name in ("replace", "fsync")}
    outcomes = []
    for crash_at in range(1, 20):
        directory = tmp_path / f"s{crash_at}"
        before = HardExampleStore(cfg(capacity=6), None, seed=11)
        before.load_state_dict(old)
        before.commit(directory)
        calls = [0]

        def failing(*args, _name):
            calls[0] += 1
            if calls[0] == crash_at:
                raise _Crash(_name)
            return real[_name](*args)

        for name in real:
            monkeypatch.setattr(os, name, lambda *a, _n=name: failing(*a, _name=_n))
        try:
            s.commit(directory)
            finished = True
        except _Crash:
            finished = False
        monkeypatch.undo()
        state = HardExampleStore(cfg(capacity=6), directory, seed=11).state_dict()
        assert state in (old, new) and (state == new or not finished)
        assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
        outcomes.append(state == new)
        if finished:
            break
    assert outcomes[0] is False and outcomes[-1] is True and len(outcomes) >= 6
