"""Weight sync Megatron (TP=2, PP=2, TP=2 x PP=2) -> vLLM after an optimizer step: the engine's log-probs on
fixed sequences match Megatron's within 1e-4 (fp32) and differ from the pre-step ones. The engine runs in its
own process on rank 0 (an in-process engine hangs under several gloo ranks)."""
from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.megatron_models import init_parallel

pytestmark = pytest.mark.distributed
TOL = 1e-4
SHAPE = dict(vocab_size=64, hidden_size=128, num_layers=4, num_attention_heads=4, num_kv_heads=2, head_dim=32,
             ffn_hidden_size=256, max_position_embeddings=128)
SEQS = [[2, 10, 11, 12, 13, 14, 15, 16, 17, 20, 21], [2, 10, 11, 12, 13, 14, 15, 30, 31, 32, 33]]


def _batch(seqs):
    from megatron_meml.training.forward_step import SFT
    from megatron_meml.types import TrainBatch

    tokens = torch.tensor(seqs)
    mask = torch.ones(tokens.shape)
    mask[:, -1] = 0
    return TrainBatch(tokens=tokens, loss_mask=mask, row_kind=torch.full((len(seqs),), SFT),
                      advantages=torch.zeros(len(seqs)))


def _sync_body(rank, world, tmp, tp, pp, tie):
    from megatron_meml.algo.config import AlgoConfig
    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.rollout.config import RolloutConfig
    from megatron_meml.rollout.vllm_backend import VLLMBackend
    from megatron_meml.rollout.weight_sync import collect_hf_weights, sync_weights, write_hf_dir
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import setup_training
    from megatron_meml.training.trainer import Trainer
    from tests.tiny_hf import char_tokenizer

    init_parallel(tp, pp, seed=5)
    mcfg = ModelConfig(**SHAPE, tie_embeddings=tie)
    arch = arch_from_model_config(mcfg)
    state = setup_training(arch, mcfg, ParallelConfig(tp=tp, pp=pp), TrainConfig(), lr=1e-2)
    trainer = Trainer(state, AlgoConfig(), micro_batch_size=2, pad_id=1)
    named = collect_hf_weights(state.model, arch)
    engine = None
    if rank == 0:
        hf_dir = write_hf_dir(tmp / "hf", arch, named, char_tokenizer())
        engine = VLLMBackend(hf_dir, RolloutConfig(kv_cache_gb=0.0625), max_model_len=64, mode="multiprocess")
        torch.testing.assert_close(_engine_lp(engine), _megatron_lp(trainer), atol=TOL, rtol=0)
    else:
        _megatron_lp(trainer)
    before = _megatron_lp(trainer)
    trainer.train_step(_batch(SEQS))
    after = _megatron_lp(trainer)
    assert (after - before).abs().max() > 1e-3, "the optimizer step did not change the model"
    metrics = sync_weights(engine, state.model, arch)
    if rank == 0:
        got = _engine_lp(engine)
        torch.testing.assert_close(got, after, atol=TOL, rtol=0)
        assert metrics["weight_sync/bytes"] > 0
        engine.shutdown()


def _megatron_lp(trainer):
    lp = trainer.compute_logprobs(_batch(SEQS))
    return lp[:, :-1]


def _engine_lp(engine):
    return torch.tensor(engine.prompt_logprobs(SEQS))


@pytest.mark.parametrize("tp,pp,tie", [(2, 1, True), (1, 2, False), (2, 2, True)], ids=["tp2", "pp2", "tp2xpp2"])
def test_sync_after_step_matches_megatron(tmp_path, tp, pp, tie):
    run_distributed(_sync_body, tp * pp, tmp_path, tp, pp, tie, megatron=True, timeout_s=900)


class _RecordingEngine:
    """Stands in for the rollout engine: keeps what a push hands it."""

    def update_weights(self, named):
        self.named = list(named)
        return sum(t.numel() * t.element_size() for _, t in named)


def _engine_dtype_body(rank, world, tmp):
    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.model.provider import build_model
    from megatron_meml.rollout.weight_sync import collect_hf_weights, sync_weights

    par = init_parallel(2, 2, seed=5)
    mcfg = ModelConfig(**SHAPE, tie_embeddings=True, dtype="bf16")
    arch = arch_from_model_config(mcfg)
    chunks = [build_model(arch, mcfg, par)]
    # a bf16 trainer holds every weight in bf16, the norms too (provider._norms_in_params_dtype)
    assert all(t.dtype == torch.bfloat16 for t in chunks[0].parameters()), \
        [n for n, t in chunks[0].named_parameters() if t.dtype != torch.bfloat16]
    own = collect_hf_weights(chunks, arch)
    engine = _RecordingEngine() if rank == 0 else None
    metrics = sync_weights(engine, chunks, arch, dtype=torch.float32, bucket_mb=1)  # an fp32 engine
    if rank != 0:
        return
    want = dict(own)
    assert sorted(n for n, _ in engine.named) == sorted(want) and len(engine.named) == len(want)
    for name, got in engine.named:
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want[name].to(torch.float32), atol=0, rtol=0)
    assert metrics["weight_sync/bytes"] == sum(t.numel() * 4 for _, t in own)


def test_sync_casts_to_the_engine_dtype_tp2xpp2(tmp_path):
    """bf16 trainer -> an fp32 engine: every pushed tensor is fp32 (the exact upcast), from every stage."""
    run_distributed(_engine_dtype_body, 4, tmp_path, megatron=True)
