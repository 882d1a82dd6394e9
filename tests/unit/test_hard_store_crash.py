"""Crash safety: SIGKILL a committing writer process at random moments, then reopen the store.

The writer is deterministic (its state after step s is a function of s), so an in-memory replay of the same
steps is the reference: after every kill the reopened store must equal the reference at its committed step, that
step must be at least the last one the writer reported committed, and no temp or orphan file may remain.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

from megatron_meml.hard_examples import HardExampleConfig, HardExampleStore
from megatron_meml.hard_examples import persist
from megatron_meml.types import ExpertGroup, Problem

CFG = HardExampleConfig(k_wrong=6, capacity=600, max_replays=3)  # admission probability 6/8
SEED = 7
TRIALS = 24
FILLER = "Let x be the number of apples. " * 12


def _groups(step: int) -> list[ExpertGroup]:
    out = []
    for i in range(60):
        pid = f"p{(step * 37 + i * 11) % 1500}"
        wrong = 8 - (step + 3 * i) % 4                      # 8, 7 (hard) / 6, 5 (solved)
        problem = Problem(id=pid, question=f"{FILLER} Question {pid}?", answer=str(i), solution=f"{FILLER} {i}")
        out.append(ExpertGroup(problem=problem, expert=i % 3, completions=[],
                               rewards=[0.0] * wrong + [1.0] * (8 - wrong)))
    return out


def _advance(store: HardExampleStore) -> None:
    step = store.step + 1
    store.update(_groups(step), step)
    if store.sft_due:
        store.record_replay()


def _writer(directory: str, conn) -> None:
    store = HardExampleStore(CFG, directory, seed=SEED)
    while True:
        _advance(store)
        store.commit()
        conn.send(store.step)


class _Reference:
    """The writer's states, replayed in memory: state(s) = state_dict after step s."""

    def __init__(self) -> None:
        self.store = HardExampleStore(CFG, None, seed=SEED)
        self.states = {-1: self.store.state_dict()}

    def state(self, step: int) -> dict:
        while self.store.step < step:
            _advance(self.store)
            self.states[self.store.step] = self.store.state_dict()
        return self.states[step]


def test_sigkill_during_commits_loses_nothing_committed(tmp_path):
    directory = tmp_path / "store"
    rng = random.Random(0)
    ctx = mp.get_context("fork")
    ref = _Reference()
    committed, mid_commit = -1, 0
    for trial in range(TRIALS):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer, args=(str(directory), send))
        proc.start()
        send.close()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL, f"trial {trial}: writer died on its own ({proc.exitcode})"
        reported = []
        while recv.poll():
            try:
                reported.append(recv.recv())
            except EOFError:
                break
        recv.close()
        names = {p.name for p in directory.iterdir()}
        body = persist.read_manifest(directory)
        listed = {s["file"] for s in body["shards"]} if body else set()
        mid_commit += bool(names - listed - {persist.MANIFEST})   # temp or not-yet-committed files left behind

        store = HardExampleStore(CFG, directory, seed=SEED)
        assert store.step >= max(reported, default=committed), f"trial {trial}: a reported commit was lost"
        assert store.state_dict() == ref.state(store.step), f"trial {trial}: reopened state differs"
        left = {p.name for p in directory.iterdir()}
        assert left == listed | {persist.MANIFEST} if body else not left
        committed = store.step
    assert committed > TRIALS, "the writer made too little progress for the test to mean anything"
    print(f"mid-commit kills: {mid_commit}/{TRIALS}, last step {committed}")
    assert mid_commit >= TRIALS // 8, f"only {mid_commit} of {TRIALS} kills landed inside a commit"
