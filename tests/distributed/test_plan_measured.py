"""``meml plan``'s exact rows against a real Megatron model + distributed optimizer in 2 gloo ranks.

For several layouts (DP=2 fp32 and bf16, TP=2, PP=2 with tied embeddings, PP=2 x VPP=2) each rank builds the
model with ``setup_training``, takes one optimizer step (Adam allocates its state lazily), and compares with the
planner element for element: parameters on the rank, padded grad-buffer elements, the optimizer shard
(exp_avg and exp_avg_sq numel) and the optimizer bytes (moments + fp32 main params); a bf16 model holds its RMSNorm
weights in bf16 too (one buffer, with fp32 main copies). The shape is deliberately
unaligned (hidden 40, head_dim 10, vocab 50) so that Megatron's 64-element and lcm(dp, 128) padding shows.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

SHAPE = dict(family="qwen2", vocab_size=50, hidden_size=40, num_layers=4, num_attention_heads=4, num_kv_heads=2,
             head_dim=10, ffn_hidden_size=72, max_position_embeddings=32, layer_spec="local")
# (tp, pp, vpp, dtype, tie_embeddings)
LAYOUTS = [(1, 1, None, "fp32", False), (1, 1, None, "bf16", True), (2, 1, None, "fp32", False),
           (1, 2, None, "fp32", True), (1, 2, 2, "bf16", True)]


def _measure(state) -> tuple[int, int, int, int, int]:
    """(params, grad-buffer elements, weight bytes, optimizer-moment elements, optimizer bytes) on this rank."""
    from megatron_meml.model.provider import unwrap

    params = sum(p.numel() for c in state.model for p in unwrap(c).parameters())
    buffers = sum(b.numel for c in state.model for b in c.buffers)
    weights = sum(b.param_data.numel() * b.param_data.element_size() for c in state.model for b in c.buffers)
    moments = nbytes = 0
    for opt in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        for st in opt.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                nbytes += st[key].numel() * st[key].element_size()
            moments += st["exp_avg"].numel()
        for group in getattr(opt, "shard_fp32_from_float16_groups", []):
            nbytes += sum(p.numel() * p.element_size() for p in group)
    return params, buffers, weights, moments, nbytes


def _body(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.experiments.plan import rank_state
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import setup_training, zero_grads

    for tp, pp, vpp, dtype, tie in LAYOUTS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vpp)
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        mcfg = ModelConfig(**SHAPE, dtype=dtype, tie_embeddings=tie)
        arch, par = arch_from_model_config(mcfg), ParallelConfig(tp=tp, pp=pp, vpp=vpp)
        state = setup_training(arch, mcfg, par, TrainConfig(), lr=1e-3)
        zero_grads(state)
        state.optimizer.step()
        got = _measure(state)

        rs = rank_state(arch, par, dtype, ps.get_pipeline_model_parallel_rank(),
                        ps.get_data_parallel_world_size())
        r = ps.get_data_parallel_rank()
        want = (rs.params, rs.buffer_numel, rs.weight_bytes, rs.shards[r], rs.optim_bytes[r])
        assert got == want, f"layout tp={tp} pp={pp} vpp={vpp} {dtype} tie={tie} rank {rank}: measured " \
                            f"(params, buffer, weight bytes, moments, optimizer bytes) = {got}, planned {want}"
        ps.destroy_model_parallel()


def test_plan_parameters_and_optimizer_bytes_are_exact():
    run_distributed(_body, 2, megatron=True)
