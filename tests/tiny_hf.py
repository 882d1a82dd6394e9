"""Tiny random Hugging Face models with a char-level tokenizer, built in the test (no hub). Test-only."""
from __future__ import annotations

from pathlib import Path

import torch

CHARS = list("0123456789+=-* abcdefghijklmnopqrstuvwxyz#.\n")
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|bos|>"]


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|bos|>", unk_token="<|endoftext|>")


def make_tiny_hf(path: str | Path, *, family: str = "qwen2", tie: bool = True, seed: int = 0, layers: int = 2,
                 hidden: int = 128, heads: int = 4, kv_heads: int = 2, head_dim: int = 32, ffn: int = 256,
                 vocab: int = 64, rope_scaling: dict | None = None):
    """Save a random model + tokenizer to ``path``; returns the model (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=256, tie_word_embeddings=tie, eos_token_id=0, pad_token_id=1,
                  bos_token_id=2, torch_dtype="float32")
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling=rope_scaling, rope_theta=500000.0))
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    char_tokenizer().save_pretrained(str(path))
    return model


def hf_token_logprobs(model, seq: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1 under a HF model, fp32 [len - 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits.float()
    lp = torch.log_softmax(logits[0, :-1], -1)
    return lp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
