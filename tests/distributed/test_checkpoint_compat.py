"""A checkpoint written by an older megatron-core still resumes: tests/fixtures/ckpt_mcore_0_16_1 (a tiny model
and its distributed-optimizer state after one step, saved under megatron-core 0.16.1 by
tests/fixtures/make_old_checkpoint.py) loads into the installed megatron-core with the weights it was saved with,
and the next step gives the weights and loss that 0.16.1 itself gave (so the Adam moments and step count came back
too). And a checkpoint that cannot be loaded fails with one line that names both versions and what to do."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed
from tests.fixtures.make_old_checkpoint import STEP, fixture_state, train_step, weights

pytestmark = pytest.mark.distributed
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ckpt_mcore_0_16_1"
TOL = 1e-6
"""fp32, one AdamW step of lr 1e-2 on the same weights, moments and batch (0.19.2 gives 0.16.1's numbers bit for
bit on the CI host)."""


def _resume_old(rank, world, ckpt):
    from importlib.metadata import version

    from megatron_meml.training.checkpoint import load_checkpoint, save_checkpoint
    from tests.megatron_models import init_parallel

    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    assert expected["megatron_core"] == "0.16.1"
    init_parallel(1, 1, seed=1)  # other random weights than the fixture's: the load has to replace them
    state = fixture_state()
    fresh = weights(state)
    assert any(not torch.equal(fresh[n], w) for n, w in expected["weights"].items())

    run_state = load_checkpoint(Path(ckpt), state)
    assert run_state["step"] == STEP and run_state["adam_step"] == 1.0 and run_state["with_optimizer"]
    got = weights(state)
    assert set(got) == set(expected["weights"])
    for name, w in expected["weights"].items():
        assert torch.equal(got[name], w), name

    loss = train_step(state)
    assert abs(loss - expected["loss_after_load"]) <= TOL, (loss, expected["loss_after_load"])
    after = weights(state)
    for name, w in expected["after_step"].items():
        torch.testing.assert_close(after[name], w, atol=TOL, rtol=0, msg=name)

    out = save_checkpoint(Path(ckpt).parent / "resaved", STEP + 1, state, {})  # a new checkpoint names its release
    assert json.loads((out / "run_state.json").read_text())["megatron_core"] == version("megatron-core")


def test_checkpoint_from_megatron_core_0_16_1_resumes(tmp_path):
    ckpt = tmp_path / FIXTURE.name
    shutil.copytree(FIXTURE / f"step_{STEP:07d}", ckpt)
    run_distributed(_resume_old, 1, str(ckpt), megatron=True)


def _unloadable(rank, world, ckpt, release, distributed_optimizer, weights_load):
    """Load ``ckpt`` (``release``: the megatron-core it names, or None) and check the one-line message."""
    from dataclasses import replace

    from megatron_meml.errors import CheckpointError
    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.training.checkpoint import load_checkpoint, load_model_weights, megatron_core_release
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import setup_training
    from tests.fixtures.make_old_checkpoint import LR, SHAPE
    from tests.megatron_models import init_parallel

    par = replace(init_parallel(1, 1), distributed_optimizer=distributed_optimizer)
    cfg = ModelConfig(**SHAPE)
    state = setup_training(arch_from_model_config(cfg), cfg, par, TrainConfig(grad_clip=0.0), lr=LR)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(Path(ckpt), state)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint '{ckpt}' "), msg
    installed = megatron_core_release()
    wrote = release or "0.16.1"
    if wrote == installed:  # nothing to say about releases
        assert "written by" not in msg and "pip install" not in msg, msg
    else:
        assert f"written by megatron-core {wrote}" in msg and f"installed megatron-core {installed}" in msg, msg
        assert ("(assumed: it records no release)" in msg) == (release is None), msg
        assert f"pip install megatron-core=={wrote})" in msg, msg
    assert ("checkpoint.load_optimizer=false" in msg) == weights_load, msg
    assert ("check that it is complete" in msg) == (wrote == installed and not weights_load), msg
    if not weights_load:  # the same directory as model.megatron_path: one line naming it, not a DCP traceback
        with pytest.raises(CheckpointError) as err:
            load_model_weights(Path(ckpt), state.model)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"could not load Megatron weights from '{ckpt}'"), msg


def _copy(tmp_path: Path, release: str | None = None, tensors: bool = True) -> Path:
    """The fixture checkpoint in ``tmp_path``; with ``release``, its run_state.json names that megatron-core;
    without ``tensors``, its tensor files are gone."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / f"step_{STEP:07d}", ckpt)
    if release is not None:
        rs = json.loads((ckpt / "run_state.json").read_text())
        (ckpt / "run_state.json").write_text(json.dumps(dict(rs, megatron_core=release)))
    if not tensors:
        for f in ckpt.glob("*.distcp"):
            f.unlink()
    return ckpt


def test_unloadable_checkpoint_names_both_releases(tmp_path):
    """The fixture without its tensor files: neither the optimizer state nor the weights load, and the message
    names the checkpoint, both releases (0.16.1 for a checkpoint that records none) and the release to install."""
    run_distributed(_unloadable, 1, str(_copy(tmp_path, tensors=False)), None, True, False, megatron=True)


def test_unloadable_optimizer_state_offers_a_fresh_optimizer(tmp_path):
    """Optimizer state that does not fit (a distributed optimizer's shards loaded into a plain one) while the
    weights do: the message also offers resuming the weights with a fresh optimizer."""
    run_distributed(_unloadable, 1, str(_copy(tmp_path, "0.15.0")), "0.15.0", False, True, megatron=True)


def test_unloadable_checkpoint_of_the_installed_release(tmp_path):
    """A damaged checkpoint that the installed release wrote: no release advice, but what to check."""
    from importlib.metadata import version

    ckpt = _copy(tmp_path, version("megatron-core"), tensors=False)
    run_distributed(_unloadable, 1, str(ckpt), version("megatron-core"), True, False, megatron=True)
