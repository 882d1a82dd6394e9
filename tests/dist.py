"""Run a test body in N gloo processes on CPU and surface every rank's failure with its traceback.

Usage (the body must be a module-level function so that ``spawn`` can import it)::

    def _body(rank, world, tmp):          # runs in each rank, process group already initialised
        ...
    def test_x(tmp_path):
        run_distributed(_body, 2, str(tmp_path))

With ``megatron=True`` the CPU shim (tests/megatron_cpu.py) is installed in each rank before the body runs.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, megatron: bool, threads: int,
            errq: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        if megatron:
            from tests.megatron_cpu import install_cpu_shim

            install_cpu_shim()
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        errq.put((rank, traceback.format_exc()))
        os._exit(1)  # peers blocked in a collective are ended by the parent
    finally:
        if megatron:
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:  # noqa: BLE001
                pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any, megatron: bool = False, threads: int = 1,
                    timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; raise with every failing rank's traceback."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, megatron, threads, errq), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + timeout_s
    failures: list[tuple[int, str]] = []
    while any(p.is_alive() for p in procs):
        while not errq.empty():
            failures.append(errq.get())
        if failures or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if any(p.is_alive() for p in procs):
        time.sleep(1.0)  # let the other ranks report their own errors
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    while not errq.empty():
        failures.append(errq.get())
    if failures:
        msg = "\n".join(f"---- rank {r} failed ----\n{tb}" for r, tb in sorted(failures))
        raise AssertionError(f"{len(failures)} of {world} ranks failed:\n{msg}")
    if time.monotonic() > deadline:
        raise AssertionError(f"distributed test timed out after {timeout_s}s")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited abnormally without a Python error (rank, exitcode): {bad}")
