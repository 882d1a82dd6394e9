"""``train.log_term_grad_norms``: each loss term's own gradient norm (pg, mutual, sft), against an independent
reference: the same full batch trained with the other terms switched off (lambdas 0, GRPO advantages 0 under the
paper's loss, whose gradient is then exactly 0). At TP=2, and at DP=2 with one rank holding GRPO rows only (so that
rank runs the terms it lacks on a row scored nowhere). fp32, relative 1e-5 on norms of size ~0.1-10. The step
itself is unchanged by the diagnostic: the weights after it equal those of a plain step, bit for bit."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed
from tests.distributed.test_train_step_parity import PAD, mixed_batch
from tests.megatron_models import init_parallel, load_model, save_model, tiny_arch, tiny_model_config

pytestmark = pytest.mark.distributed
RTOL = 1e-5


def _batch(dp_rank):
    from megatron_meml.training.forward_step import GRPO
    from megatron_meml.training.packing import take_rows

    batch = mixed_batch("paper")
    if dp_rank == 0:
        return batch
    return take_rows(batch, (batch.row_kind == GRPO).nonzero().squeeze(-1).tolist())


def _step(tmp, tp, dp_rank, batch, algo, diag):
    """(metrics, weights after) of one step from the saved weights."""
    from megatron_meml.model.provider import unwrap
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import setup_training
    from megatron_meml.training.trainer import Trainer

    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    init_parallel(tp, 1)
    par = ParallelConfig(tp=tp, pp=1, distributed_optimizer=False)
    # a clip too large to act, so that the step still reports the gradient norm
    state = setup_training(tiny_arch(), tiny_model_config(), par, TrainConfig(grad_clip=1e9), lr=1e-3)
    load_model(unwrap(state.model[0]), f"{tmp}/ckpt")
    trainer = Trainer(state, algo, micro_batch_size=3, pad_id=PAD, log_term_grad_norms=diag)
    metrics = trainer.train_step(batch)
    return metrics, [p.detach().clone() for p in unwrap(state.model[0]).parameters()]


def _check(rank, world, tmp, tp):
    from megatron_meml.algo.config import AlgoConfig
    from megatron_meml.training.forward_step import GRPO

    dp_rank = rank // tp
    batch = _batch(dp_rank)
    algo = AlgoConfig(lambda_kl=0.7, lambda_sft=0.3)
    got, after = _step(tmp, tp, dp_rank, batch, algo, diag=True)
    plain, after_plain = _step(tmp, tp, dp_rank, batch, algo, diag=False)
    assert all(torch.equal(a, b) for a, b in zip(after, after_plain))
    assert got["train/grad_norm"] == plain["train/grad_norm"]
    no_pg = dataclasses.replace(batch, advantages=torch.where(batch.row_kind == GRPO, 0.0, batch.advantages))
    refs = {"pg": (batch, dataclasses.replace(algo, lambda_kl=0.0, lambda_sft=0.0)),
            "mutual": (no_pg, dataclasses.replace(algo, lambda_sft=0.0)),
            "sft": (no_pg, dataclasses.replace(algo, lambda_kl=0.0))}
    for term, (b, a) in refs.items():
        want = _step(tmp, tp, dp_rank, b, a, diag=False)[0]["train/grad_norm"]
        assert want > 1e-3, (term, want)
        assert abs(got[f"train/grad_norm_{term}"] - want) <= RTOL * want, (term, got[f"train/grad_norm_{term}"], want)
    # the terms are not parallel, so the full norm is below their sum: the per-term norms are not the full one
    total = sum(got[f"train/grad_norm_{t}"] for t in refs)
    assert got["train/grad_norm"] < total * (1 - 1e-3), (got["train/grad_norm"], total)


def _save(rank, world, tmp):
    from megatron_meml.model.provider import build_model

    par = init_parallel(1, 1)
    save_model(build_model(tiny_arch(), tiny_model_config(), par), f"{tmp}/ckpt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("term_norms"))
    run_distributed(_save, 1, tmp, megatron=True)
    return tmp


@pytest.mark.parametrize("tp,dp", [(2, 1), (1, 2)], ids=["tp2", "dp2"])
def test_term_grad_norms_match_each_term_trained_alone(saved, tp, dp):
    run_distributed(_check, tp * dp, saved, tp, megatron=True)
