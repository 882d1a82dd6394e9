"""Shared pieces of the Megatron-on-CPU tests: a tiny model, a reference build saved to a dist checkpoint,
a plain LM forward step for Megatron's schedules. Test-only."""
from __future__ import annotations

from functools import partial

import torch

from megatron_meml.model.arch import arch_from_model_config
from megatron_meml.model.config import ModelConfig
from megatron_meml.model.provider import causal_mask
from megatron_meml.parallel import ParallelConfig

TINY = dict(vocab_size=64, hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2, head_dim=16,
            ffn_hidden_size=128, max_position_embeddings=64)
SEQ = 12


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 0) -> ParallelConfig:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ParallelConfig(tp=tp, pp=pp)


def fixed_batch(n: int = 8, seq: int = SEQ, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, TINY["vocab_size"], (n, seq + 1), generator=g)
    return toks[:, :-1].contiguous(), toks[:, 1:].contiguous()


def save_model(model, path: str) -> None:
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), path)


def load_model(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)


def lm_forward_step(data_iterator, model):
    """Megatron forward_step_func: per-token CE from GPTModel's vocab-parallel path, mean over the micro-batch."""
    tokens, labels = next(data_iterator)
    t = tokens.shape[1]
    pos = torch.arange(t)[None].expand_as(tokens)
    out = model(tokens, pos, causal_mask(t), labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    return out, partial(loss_func)


def gather_tp_logits(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def tiny_arch(**overrides):
    return arch_from_model_config(tiny_model_config(**overrides))
