"""The KL-to-reference term (algo.kl_coef > 0): the frozen reference policy's log-probs at TP=2 and PP=2 equal the
single-process ones (fp32, 1e-5 absolute on log-probs of magnitude ~4), the reference stays frozen while the
policy trains, and the KL starts at 0 (policy == reference) and grows once the policy moves."""
from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.distributed.test_train_step_parity import PAD, mixed_batch
from tests.megatron_models import init_parallel, load_model, save_model, tiny_arch, tiny_model_config

pytestmark = pytest.mark.distributed
TOL = 1e-5


def _trainer(tmp, tp, pp):
    from megatron_meml.algo.config import AlgoConfig
    from megatron_meml.model.provider import unwrap
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import build_reference, setup_training
    from megatron_meml.training.trainer import Trainer

    init_parallel(tp, pp)
    par = ParallelConfig(tp=tp, pp=pp, distributed_optimizer=False)
    state = setup_training(tiny_arch(), tiny_model_config(), par, TrainConfig(grad_clip=0.0), lr=1e-2)
    load_model(unwrap(state.model[0]), f"{tmp}/ckpt")
    reference = build_reference(tiny_arch(), tiny_model_config(), par, state.model)
    algo = AlgoConfig(kl_coef=0.1, kl_type="k3", lambda_kl=0.7, lambda_sft=0.3)
    return Trainer(state, algo, micro_batch_size=3, pad_id=PAD, reference=reference)


def _save(rank, world, tmp):
    from megatron.core import parallel_state as ps

    from megatron_meml.model.provider import build_model

    par = init_parallel(1, 1)
    save_model(build_model(tiny_arch(), tiny_model_config(), par), f"{tmp}/ckpt")
    ps.destroy_model_parallel()
    batch = mixed_batch("paper")
    ref = _trainer(tmp, 1, 1).with_reference(batch).ref_logprobs
    torch.save({"ref": ref}, f"{tmp}/ref.pt")


def _check(rank, world, tmp, tp, pp):
    from megatron_meml.training.forward_step import GRPO

    batch = mixed_batch("paper")
    trainer = _trainer(tmp, tp, pp)
    want = torch.load(f"{tmp}/ref.pt", weights_only=True)["ref"]
    got = trainer.with_reference(batch).ref_logprobs
    grpo = batch.row_kind == GRPO
    assert want[grpo].abs().max() > 1.0 and not got[~grpo].any()  # only GRPO rows are scored
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    before = trainer.compute_logprobs(batch)
    m1 = trainer.train_step(batch)
    assert 0.0 <= m1["train/kl_ref"] < 1e-6, m1["train/kl_ref"]  # policy == reference at the first step
    after = trainer.compute_logprobs(batch)
    assert (after - before)[grpo].abs().max() > 1e-3  # the policy moved
    assert torch.equal(trainer.with_reference(batch).ref_logprobs, got)  # the reference did not
    m2 = trainer.train_step(batch)
    assert m2["train/kl_ref"] > 1e-6, m2["train/kl_ref"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("kl_ref"))
    run_distributed(_save, 1, tmp, megatron=True)
    return tmp


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_reference_logprobs_match_single_process_and_stay_frozen(saved, tp, pp):
    run_distributed(_check, tp * pp, saved, tp, pp, megatron=True)
