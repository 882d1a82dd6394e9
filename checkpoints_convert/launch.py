"""Run a function on N ranks: in place under torchrun, else in N freshly spawned gloo/nccl processes.

Spawned children always run in new processes (even N = 1) so the CPU shim and the process group never touch
the caller's interpreter.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from checkpoints_convert.mapping import ConvertError


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads))
    import torch

    torch.set_num_threads(threads)
    try:
        queue.put((rank, True, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it with every rank's story
        queue.put((rank, False, str(e) if isinstance(e, ConvertError) else traceback.format_exc()))
        os._exit(1)  # peers blocked in a collective are ended by the parent


def run_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    """``fn(*args)`` on every rank; returns the results in rank order (only this rank's under torchrun)."""
    if under_torchrun():
        return [fn(*args)]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    while len(results) + len(errors) < world and not errors:
        if queue.empty():
            if not any(p.is_alive() for p in procs):
                break
            time.sleep(0.05)
            continue
        rank, ok, value = queue.get()
        (results if ok else errors)[rank] = value
    for p in procs:
        p.join(1.0 if errors else None)
        if p.is_alive():
            p.kill()
            p.join()
    while not queue.empty():
        rank, ok, value = queue.get()
        (results if ok else errors)[rank] = value
    if errors:
        raise ConvertError("\n".join(f"rank {r}: {msg}" for r, msg in sorted(errors.items())))
    if len(results) < world:
        codes = {r: p.exitcode for r, p in enumerate(procs) if r not in results}
        raise ConvertError(f"ranks ended without a result (rank: exit code): {codes}")
    return [results[r] for r in range(world)]
