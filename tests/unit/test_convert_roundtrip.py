"""HF -> Megatron (stored for TP=2, PP=2) -> HF reproduces every tensor bit for bit; the result loads in
transformers. Also home of ``tiny_hf_model``, the tiny random models the conversion tests share."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints_convert.convert import hf_to_megatron_dir, megatron_to_hf_dir

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
WORDS = "the cat sat on a mat two plus three is five what does equal".split()


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))


def tiny_hf_model(kind: str, path: Path, *, layers: int = 4, seed: int = 0) -> Path:
    """Random tiny model saved with save_pretrained (+ a word-level tokenizer).

    qwen2: q/k/v bias, tied embeddings, GQA 4/2. llama: untied, GQA 4/2, Llama 3.1 rope scaling; its config.json
    is written the way the Llama 3.1/3.2 hub files are (top-level rope_theta and rope_scaling).
    ``initializer_range`` 0.1 keeps logits O(1), so a 1e-5 logit tolerance is a real test.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, rope_theta=5e5, rms_norm_eps=1e-5,
                                             rope_scaling=dict(LLAMA31_ROPE)))
    model.save_pretrained(str(path))
    if kind == "llama":
        cfg = json.loads((path / "config.json").read_text())
        rope = dict(cfg.pop("rope_parameters", None) or LLAMA31_ROPE)
        cfg["rope_theta"] = rope.pop("rope_theta", 5e5)
        cfg["rope_scaling"] = rope
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_tokenizer(path)
    return path


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_hf_model(kind, tmp_path / "hf")
    hf_to_megatron_dir(src, tmp_path / "meg", tp=2, pp=2)
    meta = json.loads((tmp_path / "meg" / "convert_meta.json").read_text())
    assert (meta["family"], meta["dtype"], meta["saved_tp"]) == (kind, "float32", 2)
    megatron_to_hf_dir(tmp_path / "meg", tmp_path / "back", max_shard_bytes=100_000)  # forces several shards
    a = load_file(str(src / "model.safetensors"))
    back = tmp_path / "back"
    index = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    b = {}
    for f in set(index.values()):
        b.update(load_file(str(back / f)))
    assert sorted(a) == sorted(b)
    assert ("lm_head.weight" in a) == (kind == "llama")
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(src)).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(back)).eval()(ids).logits
    assert torch.equal(want, got)
    text = "two plus three is five"
    assert AutoTokenizer.from_pretrained(str(back))(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(src))(text)["input_ids"]
    assert (back / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_bf16_storage_round_trips_as_bf16(tmp_path):
    src = tiny_hf_model("qwen2", tmp_path / "hf", layers=2)
    hf_to_megatron_dir(src, tmp_path / "meg", dtype="bf16")
    megatron_to_hf_dir(tmp_path / "meg", tmp_path / "back")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
