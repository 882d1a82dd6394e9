"""``algo.pg_normaliser=all`` and ``algo.aux_normaliser=policy`` under paper_pg give the same step at one process,
TP=2 and DP=2 as an independent single-process reference (fp32, 1e-5 absolute; gradients here are O(1e-2..1)):
every GRPO row trained, the rows with A <= 0 at loss 0 but counted by the policy normaliser as rows present, and
the auxiliary terms over their own counts with lambdas rescaled by hand, lambda1 N_pairs / N_pg and
lambda2 N_sft / N_pg. The steps under test leave the A <= 0 rows out of the batch and keep their share of the
normaliser (``TrainBatch.pg_norm_extra``), as the RIEL step builds them.

``train.log_term_grad_norms`` under the new normalisers: at DP=2 with one rank holding GRPO rows only, each term's
gradient norm under ``policy`` is the one under ``own`` times the ratio of the normalisers (pg 1, mutual
N_pairs / N_pg, sft N_sft_tokens / N_pg), so the diagnostic divides each term's rows by the whole step's counts."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed
from tests.distributed.test_train_step_parity import PAD, _full_shard, mixed_batch
from tests.megatron_models import init_parallel, load_model, save_model, tiny_arch, tiny_model_config

pytestmark = pytest.mark.distributed
TOL = 1e-5
RTOL = 1e-5
LEFT_OUT = (2, 5)  # GRPO rows at A <= 0 (row 2 is at -0.5 in mixed_batch; row 5 is set to 0)
LAMBDA_KL, LAMBDA_SFT = 0.7, 0.3


def _batch():
    batch = mixed_batch("paper")
    adv = batch.advantages.clone()
    adv[5] = 0.0
    return dataclasses.replace(batch, advantages=adv)


def _counts(batch):
    """(N_pg: every GRPO row's scored tokens, N_pairs, N_sft: SFT target tokens) of the whole batch."""
    from megatron_meml.training.forward_step import GRPO, SFT, STUDENT

    kind = batch.row_kind
    return (float(batch.loss_mask[kind == GRPO].sum()), float((kind == STUDENT).sum()),
            float(batch.loss_mask[kind == SFT].sum()))


def _algo(aux, reference=False):
    from megatron_meml.algo.config import AlgoConfig

    if reference:  # own normalisers, the lambdas carrying the ratio of the counts
        n_pg, n_pairs, n_sft = _counts(_batch())
        return AlgoConfig(lambda_kl=LAMBDA_KL * n_pairs / n_pg, lambda_sft=LAMBDA_SFT * n_sft / n_pg)
    return AlgoConfig(pg_normaliser="all", aux_normaliser=aux, lambda_kl=LAMBDA_KL, lambda_sft=LAMBDA_SFT)


def _trainer(tmp, tp, algo, diag=False):
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
    return Trainer(state, algo, micro_batch_size=3, pad_id=PAD, log_term_grad_norms=diag), unwrap(state.model[0])


def _grads(model):
    return {n: (p.main_grad.clone(), p) for n, p in model.named_parameters()}


def _reference(rank, world, tmp):
    from megatron_meml.model.provider import build_model

    par = init_parallel(1, 1)
    save_model(build_model(tiny_arch(), tiny_model_config(), par), f"{tmp}/ckpt")
    trainer, model = _trainer(tmp, 1, _algo("policy", reference=True))
    metrics = trainer.train_step(_batch())  # every row, the A <= 0 ones at loss 0
    grads = {k: g for k, (g, _) in _grads(model).items()}
    own, _ = _trainer(tmp, 1, _algo("own"))
    own_metrics = own.train_step(_left_out_batch(0, 1))
    torch.save({"grads": grads, "metrics": metrics, "own_loss": own_metrics["train/loss"]}, f"{tmp}/ref.pt")


def _left_out_batch(dp_rank, dp):
    """The batch as the RIEL step builds it: rows at A <= 0 left out, their tokens in ``pg_norm_extra``; under
    DP=2 the rows split between the ranks (pairs kept together), the left-out share on rank 0 only."""
    from megatron_meml.training.packing import take_rows

    batch = _batch()
    extra = sum(float(batch.loss_mask[r].sum()) for r in LEFT_OUT)
    keep = [r for r in range(batch.num_rows) if r not in LEFT_OUT]
    if dp > 1:
        keep = [r for r in keep if (r in (0, 1, 3, 9)) == (dp_rank == 0)]
        extra = extra if dp_rank == 0 else 0.0
    return dataclasses.replace(take_rows(batch, keep), pg_norm_extra=extra)


def _check(rank, world, tmp, tp, dp):
    from megatron.core import parallel_state as ps

    dp_rank = rank // tp if dp > 1 else 0
    trainer, model = _trainer(tmp, tp, _algo("policy"))
    metrics = trainer.train_step(_left_out_batch(dp_rank, dp))
    ref = torch.load(f"{tmp}/ref.pt", weights_only=True)
    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, (g, p) in _grads(model).items():
        want = _full_shard(name, ref["grads"][name], p, tp, tp_rank)
        assert want.abs().max() > 0 or name.endswith("bias"), f"reference grad of {name} is zero"
        torch.testing.assert_close(g, want, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
    n_pg, n_pairs, n_sft = _counts(_batch())
    want = ref["metrics"]
    assert abs(metrics["train/loss"] - want["train/loss"]) <= TOL
    assert abs(metrics["train/pg_loss"] - want["train/pg_loss"]) <= TOL
    # the terms before lambda: over N_pg here, over their own counts in the reference
    assert abs(metrics["train/mutual_kl"] - want["train/mutual_kl"] * n_pairs / n_pg) <= TOL
    assert abs(metrics["train/sft_nll"] - want["train/sft_nll"] * n_sft / n_pg) <= TOL
    assert (metrics["train/normaliser_pg"], metrics["train/normaliser_pairs"], metrics["train/normaliser_sft"]) == (
        n_pg, n_pg, n_pg)
    # the test can fail: the same rows over their own counts give another step
    assert n_pg not in (n_pairs, n_sft) and abs(ref["own_loss"] - metrics["train/loss"]) > 100 * TOL


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("normalisers"))
    run_distributed(_reference, 1, tmp, megatron=True)
    return tmp


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (1, 2)], ids=["single", "tp2", "dp2"])
def test_policy_normalisers_match_the_rescaled_reference(reference, tp, dp):
    run_distributed(_check, tp * dp, reference, tp, dp, megatron=True)


def _term_norms(rank, world, tmp):
    from megatron_meml.training.forward_step import GRPO
    from megatron_meml.training.packing import take_rows

    batch = _batch()
    if rank == 1:  # GRPO rows only: this rank runs the terms it lacks on a row scored nowhere
        batch = take_rows(batch, (batch.row_kind == GRPO).nonzero().squeeze(-1).tolist())
    got = {aux: _trainer(tmp, 1, _algo(aux), diag=True)[0].train_step(batch) for aux in ("own", "policy")}
    n_pg, n_pairs, n_sft = _counts(_batch())
    n_pg *= 2  # rank 1 holds the GRPO rows a second time
    assert got["policy"]["train/normaliser_pg"] == got["own"]["train/normaliser_pg"] == n_pg
    assert (got["own"]["train/normaliser_pairs"], got["own"]["train/normaliser_sft"]) == (n_pairs, n_sft)
    for term, ratio in (("pg", 1.0), ("mutual", n_pairs / n_pg), ("sft", n_sft / n_pg)):
        own, policy = got["own"][f"train/grad_norm_{term}"], got["policy"][f"train/grad_norm_{term}"]
        assert own > 1e-3, (term, own)
        assert abs(policy - own * ratio) <= RTOL * own * ratio, (term, policy, own, ratio)
    assert n_pairs / n_pg < 0.1 and n_sft / n_pg < 0.5  # the ratios are far from 1: a wrong count would show


def test_term_grad_norms_scale_with_the_normalisers_dp2(reference):
    run_distributed(_term_norms, 2, reference, megatron=True)
