"""A run's inputs that need no model: thread count, tokenizer and experts, train, test and dev problems (``meml
export`` and ``meml traces`` read them without building Megatron)."""
from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer

from megatron_meml.config import MemlConfig
from megatron_meml.data.loaders import load_splits
from megatron_meml.errors import RunError
from megatron_meml.experts.expert_set import ExpertSet, synthetic_expert_set
from megatron_meml.types import ProblemSplits


def setup_threads(cfg: MemlConfig) -> None:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = cfg.train.threads or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(n)


def build_experts(cfg: MemlConfig) -> ExpertSet:
    k = cfg.algo.num_experts
    if cfg.data.source == "synthetic" and cfg.model.hf_path is None:
        return synthetic_expert_set(cfg.experts, k)
    if cfg.model.hf_path is None:
        raise RunError(f"data.source={cfg.data.source} needs a tokenizer: set model.hf_path to a Hugging Face "
                       "model directory (config.json + tokenizer files)")
    try:
        tok = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"could not load the tokenizer from model.hf_path '{cfg.model.hf_path}': {e}") from e
    return ExpertSet.from_config(cfg.experts, k, tok)


def load_data(cfg: MemlConfig) -> ProblemSplits:
    """The run's train, test and dev problems (``data.seed``, else the global ``seed``)."""
    splits = load_splits(cfg.data, cfg.seed if cfg.data.seed is None else cfg.data.seed)
    if not splits.train:
        raise RunError(f"no training problems loaded from data.source={cfg.data.source} path={cfg.data.path}")
    return splits
