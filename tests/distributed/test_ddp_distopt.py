"""DP=2 with Megatron DDP + the distributed optimizer vs a single-process torch AdamW reference:
20 steps on a tiny fixed batch, per-step losses within 1e-5, and the loss falls by at least half."""
from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.megatron_models import fixed_batch, init_parallel, load_model, save_model, tiny_arch, tiny_model_config

pytestmark = pytest.mark.distributed
STEPS, LR, TOL = 20, 5e-3, 1e-5


def _loss(model, tokens, labels):
    from megatron_meml.model.provider import causal_mask

    t = tokens.shape[1]
    return model(tokens, torch.arange(t)[None].expand_as(tokens), causal_mask(t), labels=labels).float().mean()


def _reference(rank, world, tmp):
    from megatron_meml.model.provider import build_model

    par = init_parallel(1, 1)
    model = build_model(tiny_arch(), tiny_model_config(), par)
    save_model(model, f"{tmp}/ckpt")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    tokens, labels = fixed_batch()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = _loss(model, tokens, labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    torch.save(torch.stack(losses), f"{tmp}/ref_losses.pt")


def _dp(rank, world, tmp):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.model.provider import unwrap
    from megatron_meml.training.setup import setup_training, zero_grads
    from tests.megatron_models import lm_forward_step

    par = init_parallel(1, 1)
    assert ps.get_data_parallel_world_size() == 2
    state = setup_training(tiny_arch(), tiny_model_config(), par, TrainConfig(grad_clip=0.0), lr=LR)
    load_model(unwrap(state.model[0]), f"{tmp}/ckpt")
    state.optimizer.reload_model_params()  # fp32 main copies follow the loaded weights
    assert all(g["fused"] for g in state.optimizer.optimizer.param_groups)  # torch's fused CPU AdamW kernel
    tokens, labels = fixed_batch()
    mine = (tokens.chunk(2)[rank], labels.chunk(2)[rank])
    got = []
    for _ in range(STEPS):
        zero_grads(state)
        out = get_forward_backward_func()(forward_step_func=lm_forward_step, data_iterator=iter([mine]),
                                          model=state.model, num_microbatches=1, seq_length=tokens.shape[1],
                                          micro_batch_size=mine[0].shape[0], forward_only=False)
        ok, _, _ = state.optimizer.step()
        assert ok
        loss = out[0]["lm loss"].clone()
        torch.distributed.all_reduce(loss)
        got.append(loss / 2)
    got = torch.stack(got)
    ref = torch.load(f"{tmp}/ref_losses.pt", weights_only=True)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert got[-1] <= 0.5 * got[0], f"loss did not halve: {got[0]:.4f} -> {got[-1]:.4f}"


def test_dp2_ddp_distributed_optimizer_matches_adamw(tmp_path):
    run_distributed(_reference, 1, str(tmp_path), megatron=True)
    run_distributed(_dp, 2, str(tmp_path), megatron=True)
