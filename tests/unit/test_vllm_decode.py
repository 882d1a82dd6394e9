"""The backend decodes completion text itself (the engine runs with detokenize=False): the text must equal what
vLLM's own incremental detokenizer gives for the same samples. A byte-level tokenizer whose vocabulary is mostly
UTF-8 lead and continuation bytes, so random samples hold split and invalid characters; prompts end mid-character,
and stop tokens (excluded from the text) end some samples."""
from __future__ import annotations

import pytest

from megatron_meml.rollout.backend import SamplingSpec
from megatron_meml.rollout.config import RolloutConfig
from tests.tiny_hf import make_tiny_hf

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|bos|>"]
BYTES = list(b"0123456789+= abcdefghij") + [0xC3, 0xA9, 0xA4, 0xB6, 0xE2, 0x82, 0xAC, 0x80, 0x9F, 0xF0, 0x98,
                                             0x8A, 0xCE, 0xBB, 0xE4, 0xB8, 0xAD, 0xE6, 0x96, 0x87, 0xD0, 0xB4,
                                             0xC5, 0x93, 0xE3, 0x81, 0x83, 0xF4, 0x8F, 0xBF, 0xAB, 0xE8, 0x9E,
                                             0xA2, 0xEF, 0xBC, 0x9A, 0xC2]
STOPS = tuple(len(SPECIALS) + BYTES.index(b) for b in b"abc")  # not special: left out of the text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIALS + [table[b] for b in BYTES])}
    assert len(vocab) == 64
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|bos|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from megatron_meml.rollout.vllm_backend import VLLMBackend

    d = tmp_path_factory.mktemp("tiny_bytes")
    make_tiny_hf(d, layers=1)
    byte_tokenizer().save_pretrained(str(d))
    backend = VLLMBackend(d, RolloutConfig(kv_cache_gb=0.0625), max_model_len=128, mode="inprocess")
    yield backend
    backend.shutdown()


def _vllm_detokenized(backend, prompts: list[list[int]], spec: SamplingSpec) -> list[tuple[list[int], str]]:
    """The same request through vLLM's own detokenizer (same reseed, so the same samples)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    backend.llm.collective_rpc("meml_reseed", args=(spec.seed,))
    params = SamplingParams(n=spec.n, temperature=spec.temperature, max_tokens=spec.max_tokens,
                            stop_token_ids=list(spec.stop_token_ids), logprobs=0)
    outs = backend.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [(list(c.token_ids), c.text) for o in outs for c in o.outputs]


@pytest.mark.parametrize("stops", [(), STOPS])
def test_text_equals_vllm_detokenizer(engine, stops):
    assert engine._stream_tokenizer is not None  # the engine does not detokenize: the text is ours
    c3 = SPECIALS.__len__() + BYTES.index(0xC3)
    prompts = [[2, 10, 11, c3], [2, 12, c3 + 4, c3 + 5], [2, 3, 4, 5]]
    spec = SamplingSpec(n=8, max_tokens=12, temperature=1.0, seed=5, stop_token_ids=stops)
    ours = engine.generate(prompts, spec)
    want = _vllm_detokenized(engine, prompts, spec)
    assert [(c.token_ids, c.text) for c in ours] == want
    assert any(ord(ch) > 127 for c in ours for ch in c.text)  # multi-byte characters were decoded
    if stops:
        stopped = [c for c in ours if c.finish_reason == "stop" and c.token_ids[-1] in stops]
        assert stopped and all(len(c.logprobs) == len(c.token_ids) for c in stopped)


def test_sampled_logprobs_flat_and_per_position_layouts():
    from vllm.logprobs import FlatLogprobs, Logprob

    from megatron_meml.rollout.vllm_backend import RolloutEngineError, _sampled_logprobs

    flat = FlatLogprobs()
    flat.append({5: Logprob(logprob=-0.5, rank=2)})
    flat.append({7: Logprob(logprob=-1.25, rank=1)})
    assert _sampled_logprobs(flat, [5, 7]) == [-0.5, -1.25]
    wider = FlatLogprobs()  # top-1 entries besides the sampled one: read position by position
    wider.append({5: Logprob(logprob=-0.5), 3: Logprob(logprob=-0.25)})
    wider.append({7: Logprob(logprob=-1.25)})
    assert _sampled_logprobs(wider, [5, 7]) == [-0.5, -1.25]
    dicts = [{5: Logprob(logprob=-0.5)}, {7: Logprob(logprob=-1.25), 1: Logprob(logprob=-0.75)}]
    assert _sampled_logprobs(dicts, [5, 7]) == [-0.5, -1.25]
    for bad in (flat, None):
        with pytest.raises(RolloutEngineError, match="log-probs for"):
            _sampled_logprobs(bad, [5, 7, 9])


def test_rope_reload_warning_is_filtered_and_nothing_else():
    import logging

    from megatron_meml.rollout.vllm_worker import quiet_rope_reload_warning

    quiet_rope_reload_warning()
    quiet_rope_reload_warning()  # once per process
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    assert len(logger.filters) == 1

    def record(*args):
        return logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "%s: Failed to load weights", args, None)

    assert not logger.filters[0].filter(record("RotaryEmbedding"))
    assert logger.filters[0].filter(record("QKVParallelLinear"))  # a real failed load still shows
