"""Character-level tokenizers for the synthetic family (one token per character, plus four specials).

Built with ``tokenizers`` (WordLevel over single characters, fused on decode) and wrapped in
``transformers.PreTrainedTokenizerFast`` so the rest of the stack (chat-template detection, ``save_pretrained``,
vLLM) treats it like any Hugging Face tokenizer. It has no chat template: prompts use the expert set's plain
template. Padding the vocabulary to a multiple of 64 is the model's business, not the tokenizer's.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_meml.data.synthetic import ALPHABET

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
"""Ids 0..3, in this order."""


def char_tokenizer(texts: Iterable[str]):
    """A PreTrainedTokenizerFast whose vocabulary is exactly the specials plus every character in ``texts``
    (sorted by code point, so the same texts always give the same ids)."""
    chars = sorted(set("".join(texts)))
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def synthetic_tokenizer(prompt_texts: Iterable[str] = ()):
    """The char tokenizer for the synthetic family: its questions and gold work (:data:`ALPHABET`) plus
    ``prompt_texts``, i.e. everything the expert set adds around them (see ``ExpertSet.vocab_texts``)."""
    return char_tokenizer([ALPHABET, *prompt_texts])
