"""Checkpoints: model + optimizer as a Megatron dist checkpoint (reshardable), plus the run state (step,
sampler position, RNG states, metrics step) and the hard-example store.

Layout: ``<run_dir>/checkpoints/step_0000050/{dist checkpoint files, run_state.json, hard_examples/}`` and
``<run_dir>/checkpoints/latest`` naming the newest complete one. A checkpoint is written into ``*.partial`` and
renamed when every rank has finished, so a crash mid-save never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_meml.training.setup import TrainState, unwrap

LATEST = "latest"
OPTIM_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
"""Distributed-optimizer state in the canonical per-parameter form, so it reloads at another TP/PP/DP."""
RUN_STATE = "run_state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


def _model_sd(chunks: list[Any]) -> dict:
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1])}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate((3, tuple(state["python"]), None))


def save_checkpoint(root: Path, step: int, state: TrainState, run_state: dict[str, Any], *, store: Any = None,
                    keep_last: int = 2, with_optimizer: bool = True) -> Path:
    """Collective. Returns the checkpoint directory."""
    from megatron.core import dist_checkpointing

    final = root / f"step_{step:07d}"
    partial = root / f"step_{step:07d}.partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    sd = _model_sd(state.model)
    if with_optimizer:
        sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=False, metadata=OPTIM_FORMAT)
    dist_checkpointing.save(sd, str(partial))
    if store is not None:
        store.save(partial / "hard_examples")
    if _rank() == 0:
        rs = dict(run_state, step=step, with_optimizer=with_optimizer)
        (partial / RUN_STATE).write_text(json.dumps(rs))
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(final.name)
        os.replace(tmp, root / LATEST)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Optional[Path]:
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / RUN_STATE).is_file() else None


def load_checkpoint(path: Path, state: TrainState, *, load_optimizer: bool = True) -> dict[str, Any]:
    """Collective. Loads model (and optimizer) in place; returns the run state."""
    from megatron.core import dist_checkpointing

    rs_file = path / RUN_STATE
    if not rs_file.is_file():
        raise CheckpointError(f"'{path}' is not a complete megatron-meml checkpoint (no {RUN_STATE}); "
                              "point checkpoint.resume at a step_* directory or use resume=auto")
    run_state = json.loads(rs_file.read_text())
    sd = _model_sd(state.model)
    want_opt = load_optimizer and run_state.get("with_optimizer", False)
    if want_opt:
        sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=True, metadata=OPTIM_FORMAT)
    loaded = dist_checkpointing.load(sd, str(path))
    for i, chunk in enumerate(state.model):
        key = "model" if len(state.model) == 1 else f"model{i}"
        unwrap(chunk).load_state_dict(loaded[key], strict=False)
    if want_opt:
        state.optimizer.load_state_dict(loaded["optimizer"])
    else:
        state.optimizer.reload_model_params()
    return run_state


def load_model_weights(path: Path, chunks: list[Any]) -> None:
    """Model weights only (e.g. the MEF stage's result, or a converter output) into this run's chunks."""
    from megatron.core import dist_checkpointing

    if not Path(path).is_dir():
        raise CheckpointError(f"model.megatron_path '{path}' does not exist")
    sd = _model_sd(chunks)
    try:
        loaded = dist_checkpointing.load(sd, str(path))
    except Exception as e:  # noqa: BLE001 - name the directory, keep the cause
        raise CheckpointError(f"could not load Megatron weights from '{path}': {type(e).__name__}: {e}") from e
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        unwrap(chunk).load_state_dict(loaded[key], strict=False)


def save_model_weights(path: Path, chunks: list[Any]) -> Path:
    """Collective: the model only, as a dist checkpoint (``model.megatron_path`` of a later stage, or export)."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_model_sd(chunks), str(path))
    _barrier()
    return path
