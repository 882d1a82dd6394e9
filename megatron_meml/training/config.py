"""Trainer configuration: optimiser, batch sizes, steps."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings for both stages."""

    lr: float = 1e-6
    """RL (RIEL) learning rate (paper: 1e-6)."""
    sft_lr: float = 1e-5
    """SFT (MEF) learning rate (paper: 1e-5)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    problems_per_step: int = 8
    """Questions sampled per RIEL step (each expanded to K experts x G samples)."""
    micro_batch_size: int = 8
    """Sequences per micro-batch in the train step (when not packing by tokens)."""
    max_tokens_per_micro_batch: int = 0
    """> 0: the train step packs rows padding-free (THD layout, each row its own sequence) into micro-batches of at
    most this many tokens, in place of micro_batch_size rows padded to the longest; under pipeline parallelism
    every micro-batch has exactly this length, so it must hold the longest row (or mutual-learning pair).
    0: by row count. Needs model.layer_spec sdpa or te."""
    share_prompts: bool = False
    """With max_tokens_per_micro_batch: rows whose prompts are the same tokens (the G samples of an expert's group)
    share one copy of the prompt in a packed micro-batch, so the prompt's forward and backward run once per group,
    not once per sample; the same gradients (tests/distributed/test_train_step_parity.py). Needs the sdpa layer
    spec, logits_at_scored_only and no sequence parallelism."""
    logits_at_scored_only: bool = True
    """The output layer (the vocabulary matmul, its backward and the fp32 log-softmax) runs only on the positions a
    loss term scores, not on prompts and padding (without sequence parallelism). False: on every position, as
    Megatron does by default; for A/B benches and parity checks."""
    log_term_grad_norms: bool = False
    """Diagnostic: each RIEL step also logs train/grad_norm_{pg,mutual,sft}, the norm of each loss term's own
    gradient before clipping (its rows over the step's normalisers: its share of the update), to see which term
    steers the update; costs one more forward/backward per term."""
    sft_batch_size: int = 32
    """Sequences per MEF step."""
    steps: int = 100
    """RIEL steps."""
    rollout_budget: int = 0
    """RIEL also stops (as finished: final model, evaluation) once this many completions were generated, counted
    over all ranks and all dynamic-sampling refills; 0: train.steps alone decides. `meml compare` gives the
    dynamic-sampling rows the plain rows' budget, so they are compared at equal generation, not equal steps."""
    sft_steps: int = 100
    """MEF steps."""
    threads: int = 0
    """torch intra-op threads per process (0: cores / local processes)."""

    def __post_init__(self) -> None:
        for name in ("problems_per_step", "micro_batch_size", "sft_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "sft_steps", "warmup_steps", "threads", "max_tokens_per_micro_batch",
                     "rollout_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.sft_lr <= 0:
            raise ValueError("train.lr and train.sft_lr must be > 0")
