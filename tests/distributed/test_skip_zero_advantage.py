"""GRPO rows at advantage 0 left out of the batch (``algo.skip_zero_advantage``, the clipped loss without reference
KL) give the same step as training them: the same parameter gradients and loss, at one process, TP=2 and DP=2,
for the token-mean and the per-sequence aggregations (fp32, 1e-5 absolute; gradients here are O(1e-2..1)).
The reference trains every row in one process; the step under test drops the zero rows and keeps their share of
the normaliser (``TrainBatch.pg_norm_extra``)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed
from tests.distributed.test_train_step_parity import PAD, _full_shard, mixed_batch
from tests.megatron_models import init_parallel, load_model, save_model, tiny_arch, tiny_model_config

pytestmark = pytest.mark.distributed
TOL = 1e-5
ZERO = (2, 5)  # GRPO rows given advantage 0


def _batch():
    batch = mixed_batch("clipped_token")
    adv = batch.advantages.clone()
    adv[list(ZERO)] = 0.0
    return dataclasses.replace(batch, advantages=adv)


def _algo(aggregation):
    from megatron_meml.algo.config import AlgoConfig

    return AlgoConfig(policy_loss="clipped", clip_low=0.1, clip_high=0.3, aggregation=aggregation,
                      lambda_kl=0.7, lambda_sft=0.3, mutual_kind="token", mutual_normalise="token")


def _step(tmp, aggregation, tp, skip, dp_rank=0, dp=1):
    """One train step at (tp, dp); with ``skip`` the zero rows are left out. Returns ({name: grad}, metrics)."""
    from megatron.core import parallel_state as ps
    from megatron_meml.model.provider import unwrap
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.packing import take_rows
    from megatron_meml.training.setup import setup_training
    from megatron_meml.training.trainer import Trainer

    init_parallel(tp, 1)
    par = ParallelConfig(tp=tp, pp=1, distributed_optimizer=False)
    state = setup_training(tiny_arch(), tiny_model_config(), par, TrainConfig(grad_clip=0.0), lr=1e-3)
    load_model(unwrap(state.model[0]), f"{tmp}/ckpt")
    batch = _batch()
    keep = list(range(batch.num_rows))
    extra = 0.0
    if skip:
        for r in ZERO:  # what batching.zero_advantage_share counts for a left-out row
            extra += float(batch.loss_mask[r].sum()) if aggregation == "token_mean" else 1.0
        keep = [r for r in keep if r not in ZERO]
    if dp > 1:  # rows split between the ranks (pairs kept together), the left-out share on rank 0 only
        half = [r for r in keep if r in (0, 1, 2, 3, 5, 9)] if dp_rank == 0 else [r for r in keep if r in (4, 6, 7, 8)]
        keep, extra = half, (extra if dp_rank == 0 else 0.0)
    batch = dataclasses.replace(take_rows(batch, keep), pg_norm_extra=extra)
    trainer = Trainer(state, _algo(aggregation), micro_batch_size=3, pad_id=PAD, score_teachers_ahead=True)
    metrics = trainer.train_step(batch)
    assert ps.get_pipeline_model_parallel_world_size() == 1
    return {n: (p.main_grad.clone(), p) for n, p in unwrap(state.model[0]).named_parameters()}, metrics


def _reference(rank, world, tmp, aggregation):
    from megatron.core import parallel_state as ps
    from megatron_meml.model.provider import build_model

    par = init_parallel(1, 1)
    save_model(build_model(tiny_arch(), tiny_model_config(), par), f"{tmp}/ckpt")
    ps.destroy_model_parallel()
    grads, metrics = _step(tmp, aggregation, 1, skip=False)
    torch.save({"grads": {k: g for k, (g, _) in grads.items()}, "metrics": metrics}, f"{tmp}/ref.pt")


def _check(rank, world, tmp, aggregation, tp, dp):
    from megatron.core import parallel_state as ps

    dp_rank = rank // tp if dp > 1 else 0
    grads, metrics = _step(tmp, aggregation, tp, skip=True, dp_rank=dp_rank, dp=dp)
    ref = torch.load(f"{tmp}/ref.pt", weights_only=True)
    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, (g, p) in grads.items():
        want = _full_shard(name, ref["grads"][name], p, tp, tp_rank)
        assert want.abs().max() > 0 or name.endswith("bias"), f"reference grad of {name} is zero"
        torch.testing.assert_close(g, want, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
    for key in ("train/loss", "train/pg_loss", "train/mutual_kl", "train/sft_nll"):
        assert abs(metrics[key] - ref["metrics"][key]) <= TOL, (key, metrics[key], ref["metrics"][key])
    assert metrics["train/pg_loss"] != 0.0


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (1, 2)], ids=["single", "tp2", "dp2"])
def test_left_out_zero_rows_give_the_same_step(tmp_path, aggregation, tp, dp):
    run_distributed(_reference, 1, str(tmp_path), aggregation, megatron=True)
    run_distributed(_check, tp * dp, str(tmp_path), aggregation, tp, dp, megatron=True)


def test_without_the_share_the_step_differs(tmp_path):
    """The test can fail: dropping the zero rows without keeping their share of the normaliser changes the
    step (by the ratio of the normalisers), and the check above would see it."""
    run_distributed(_reference, 1, str(tmp_path), "token_mean", megatron=True)
    run_distributed(_differs, 1, str(tmp_path), megatron=True)


def _differs(rank, world, tmp):
    from megatron.core import parallel_state as ps
    from megatron_meml.model.provider import unwrap
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.packing import take_rows
    from megatron_meml.training.setup import setup_training
    from megatron_meml.training.trainer import Trainer

    init_parallel(1, 1)
    state = setup_training(tiny_arch(), tiny_model_config(), ParallelConfig(distributed_optimizer=False),
                           TrainConfig(grad_clip=0.0), lr=1e-3)
    load_model(unwrap(state.model[0]), f"{tmp}/ckpt")
    batch = _batch()
    keep = [r for r in range(batch.num_rows) if r not in ZERO]
    metrics = Trainer(state, _algo("token_mean"), micro_batch_size=3, pad_id=PAD).train_step(take_rows(batch, keep))
    ref = torch.load(f"{tmp}/ref.pt", weights_only=True)
    assert abs(metrics["train/pg_loss"] - ref["metrics"]["train/pg_loss"]) > 10 * TOL
    ps.destroy_model_parallel()
