"""Checkpoints: model + optimizer as a Megatron dist checkpoint (reshardable), plus the run state (step,
sampler position, RNG states, metrics step) and the hard-example store.

Layout: ``<run_dir>/checkpoints/step_0000050/{dist checkpoint files, run_state.json, hard_examples/, rollouts_ahead/}`` and
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
import megatron.core
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_meml.atomic_file import atomic_write
from megatron_meml.errors import CheckpointError
from megatron_meml.model.provider import unwrap
from megatron_meml.training.setup import TrainState

LATEST = "latest"
OPTIM_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
"""Distributed-optimizer state as its DP shards (reloads at another DP size; the model weights reshard freely).
The fully reshardable format fails to load with torch's AdamW (no apex/TE) in megatron-core 0.16.1."""
RUN_STATE = "run_state.json"
UNRECORDED_MCORE = "0.16.1"
"""The megatron-core release of a checkpoint whose run_state.json names none (``megatron_core``): megatron-meml
releases before 0.19.2 support wrote no release and ran 0.16.1."""
AHEAD_DIR = "rollouts_ahead"


LOAD_ERRORS = (Exception, CheckpointException)
"""What a failed dist-checkpoint load raises: torch's CheckpointException derives from BaseException, not Exception."""


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
                    keep_last: int = 2, with_optimizer: bool = True, ahead: Optional[list] = None) -> Path:
    """Collective. Returns the checkpoint directory. ``ahead``: this rank's rollouts generated for the next steps
    (``RolloutsAhead.state_dict``), one file per rank."""
    final = root / f"step_{step:07d}"
    partial = root / f"step_{step:07d}.partial"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    sd = _model_sd(state.model)
    # An optimizer that never stepped (every step so far empty: nothing scored) has no state to save, and
    # Megatron's state_dict() of such a torch AdamW fails; a fresh optimizer on resume is the same thing.
    with_optimizer = with_optimizer and any(True for _ in _inner_states(state.optimizer))
    if with_optimizer:
        sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=False, metadata=OPTIM_FORMAT)
    dist_checkpointing.save(sd, str(partial))
    if store is not None:
        store.save(partial / "hard_examples")
    if ahead is not None:
        (partial / AHEAD_DIR).mkdir(exist_ok=True)
        atomic_write(partial / AHEAD_DIR / f"rank{_rank():05d}.json", json.dumps(ahead).encode())
    if _rank() == 0:
        rs = dict(run_state, step=step, with_optimizer=with_optimizer, adam_step=adam_step(state.optimizer),
                  megatron_core=megatron_core_release())
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


def _materialise_adam_state(optimizer: Any) -> None:
    """Create the optimizer state before loading into it (Megatron's state_dict() of a torch AdamW that has not
    stepped has no 'step' entries and fails an assertion): one Adam step on zero gradients, as Megatron does for
    its fully reshardable format; the checkpoint then overwrites params, moments and step."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or any(inner.state.values()):
            continue
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()  # noqa: SLF001 - Megatron's own initialiser
        else:
            for group in inner.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            inner.step()
            inner.zero_grad()


def _inner_states(optimizer: Any):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield from inner.state.values()


def adam_step(optimizer: Any) -> float:
    """The Adam update count (bias correction) of a torch AdamW inside Megatron's optimizer; 0 if none."""
    for st in _inner_states(optimizer):
        if isinstance(st.get("step"), torch.Tensor):
            return float(st["step"])
    return 0.0


def _restore_adam_step(optimizer: Any, step: float) -> None:
    """megatron-core 0.16.1's distributed-optimizer load (torch AdamW, no apex/TE) neither restores the Adam step
    count nor keeps one tensor per parameter (it assigns one shared tensor, which AdamW would then advance once
    per parameter). Both broke bit-exact resume (caught by tests/e2e); set the saved count, one tensor each."""
    for st in _inner_states(optimizer):
        if "step" in st:
            st["step"] = torch.tensor(step, dtype=torch.float32)


def megatron_core_release() -> str:
    """The installed megatron-core release as pip names it ("0.19.2"). Its ``__version__`` appends the short commit
    of any git repository it is installed inside ("0.19.2+9104fc0" in a repository's .venv); that part goes."""
    return str(megatron.core.__version__).split("+", 1)[0]


def _cause(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters; for a DCP CheckpointException, the first failing
    rank's own exception (its str() is every rank's whole traceback)."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _load_failure(path: Path, run_state: dict[str, Any], state: TrainState, want_opt: bool, err: BaseException) -> str:
    """The one-line message for a checkpoint that does not load: the cause, the megatron-core release that wrote it
    when that is not the installed one, and the ways out. When the optimizer state was part of the load, the model
    weights alone are tried (collective, like the load): if they load, resuming without the optimizer state keeps
    the training so far."""
    saved, installed = run_state.get("megatron_core", UNRECORDED_MCORE), megatron_core_release()
    fixes = []
    if saved == installed:
        head = f"checkpoint '{path}' does not load ({_cause(err)})"
    else:
        wrote = f"megatron-core {saved}" + ("" if "megatron_core" in run_state else " (assumed: it records no release)")
        head = (f"checkpoint '{path}' was written by {wrote} and does not load with the installed megatron-core "
                f"{installed} ({_cause(err)})")
        fixes.append(f"resume it with that release (pip install megatron-core=={saved})")
    if want_opt:
        try:
            dist_checkpointing.load(_model_sd(state.model), str(path))
        except LOAD_ERRORS:  # the weights do not load either
            pass
        else:
            fixes.append("resume its model weights with a fresh optimizer (checkpoint.load_optimizer=false: "
                         "Adam's moments start again from zero)")
    if not fixes:
        fixes.append("check that it is complete (every file its save wrote) and undamaged")
    return f"{head}; " + ", or ".join(fixes)


def latest_checkpoint(root: Path) -> Optional[Path]:
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / RUN_STATE).is_file() else None


def load_checkpoint(path: Path, state: TrainState, *, load_optimizer: bool = True) -> dict[str, Any]:
    """Collective. Loads model (and optimizer) in place; returns the run state."""
    rs_file = path / RUN_STATE
    if not rs_file.is_file():
        raise CheckpointError(f"'{path}' is not a complete megatron-meml checkpoint (no {RUN_STATE}); "
                              "point checkpoint.resume at a step_* directory or use resume=auto")
    run_state = json.loads(rs_file.read_text())
    sd = _model_sd(state.model)
    want_opt = load_optimizer and run_state.get("with_optimizer", False)
    if want_opt:
        _materialise_adam_state(state.optimizer)
        sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=True, metadata=OPTIM_FORMAT)
    try:
        loaded = dist_checkpointing.load(sd, str(path))
        for i, chunk in enumerate(state.model):
            key = "model" if len(state.model) == 1 else f"model{i}"
            unwrap(chunk).load_state_dict(loaded[key], strict=False)
        if want_opt:
            with torch.no_grad():  # copies into the fp32 main params, which are leaves that require grad
                state.optimizer.load_state_dict(loaded["optimizer"])
    except LOAD_ERRORS as e:  # one line naming the checkpoint, both releases and the way out
        raise CheckpointError(_load_failure(path, run_state, state, want_opt, e)) from e
    if want_opt:
        _restore_adam_step(state.optimizer, float(run_state.get("adam_step", 0.0)))
    else:
        state.optimizer.reload_model_params()
    return run_state


def load_model_weights(path: Path, chunks: list[Any]) -> None:
    """Model weights only (e.g. the MEF stage's result, or a converter output) into this run's chunks."""
    if not Path(path).is_dir():
        raise CheckpointError(f"model.megatron_path '{path}' does not exist")
    sd = _model_sd(chunks)
    try:
        loaded = dist_checkpointing.load(sd, str(path))
    except LOAD_ERRORS as e:  # name the directory, keep the cause
        raise CheckpointError(f"could not load Megatron weights from '{path}': {_cause(e)}") from e
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        unwrap(chunk).load_state_dict(loaded[key], strict=False)


def save_model_weights(path: Path, chunks: list[Any]) -> Path:
    """Collective: the model only, as a dist checkpoint (``model.megatron_path`` of a later stage, or export)."""
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_model_sd(chunks), str(path))
    _barrier()
    return path


def load_ahead(path: Path, rank: int) -> list:
    """This rank's rollouts generated ahead (``save_checkpoint(ahead=...)``); [] for a checkpoint without any."""
    folder = path / AHEAD_DIR
    if not folder.is_dir():
        return []
    f = folder / f"rank{rank:05d}.json"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} holds rollouts generated ahead, but none for rank {rank} "
                              f"(in {folder}): resume with the world size it was saved with")
    return json.loads(f.read_text())
