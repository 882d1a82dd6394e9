"""Algorithm configuration: advantages, policy loss, mutual learning, loss weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ADVANTAGES = ("paper", "grpo", "drgrpo", "pooled")
POLICY_LOSSES = ("paper_pg", "clipped")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
MUTUAL_KINDS = ("sequence", "token")
MUTUAL_NORMALISE = ("sequence", "token")
KL_TYPES = ("k1", "k3")
PG_NORMALISERS = ("scored", "all")
AUX_NORMALISERS = ("own", "policy")
POLICY_UNITS = {"token_mean": ("sequence", "token_mean"),
                "seq_mean_token_mean": ("token", "seq_mean_token_mean"),
                "seq_mean_token_sum": ("sequence", "seq_mean_token_sum")}
"""aux_normaliser=policy: for each policy aggregation, the (mutual_normalise, sft_aggregation) whose per-row sums
are in the policy term's unit (a token sum, or one row's token mean), so that one count divides them all."""


@dataclass(frozen=True, kw_only=True)
class AlgoConfig:
    """MEML-GRPO math: what is optimised."""

    num_experts: int = 3
    """K: how many experts (the first K of experts.ids) play in RIEL."""
    advantage: str = "paper"
    """paper (r - mean, positive part only), grpo (std-normalised), drgrpo (r - mean), pooled (across experts)."""
    adv_eps: float = 1e-6
    """grpo advantage: (r - mean) / (std + adv_eps)."""
    policy_loss: str = "paper_pg"
    """paper_pg (-logp * max(A, 0)) or clipped (PPO-style ratio clipping)."""
    aggregation: str = "token_mean"
    """Loss aggregation: token_mean, seq_mean_token_mean, seq_mean_token_sum."""
    pg_normaliser: str = "scored"
    """paper_pg: what the policy term divides by. scored: the rows it trains (A > 0) only, so a step with few
    right answers weighs each as much as a step with many. all: every sampled response (the paper's
    -E[log pi * max(A, 0)] averages over every sample): rows with A <= 0 stay out of the batch (their loss is 0) but
    their tokens (token_mean) or their count (seq_* aggregations) join the normaliser. The clipped loss trains every
    row (rows at A = 0 left out keep their share), so both values count every row there."""
    clip_low: float = 0.2
    """Clipped loss: lower ratio clip epsilon."""
    clip_high: float = 0.2
    """Clipped loss: upper ratio clip epsilon (clip-higher when larger than clip_low)."""
    dual_clip: Optional[float] = None
    """Clipped loss: dual-clip constant c (> 1) for negative advantages; None disables."""
    kl_coef: float = 0.0
    """Weight of the KL-to-reference term (0 disables the reference model)."""
    kl_type: str = "k3"
    """KL estimator to the reference: k1 or k3."""
    skip_zero_advantage: bool = True
    """Clipped loss without reference KL: leave the GRPO rows whose advantage is exactly 0 (every group whose
    rewards are all equal) out of the train batch, keeping their share of the loss's normaliser. Their loss and
    gradient are exactly 0, so the step is the same up to float summation order, for less compute; the clip and
    mismatch metrics then average over the rows trained. False trains them (for A/B benches)."""
    tis_cap: Optional[float] = 2.0
    """Truncated importance-sampling cap for the rollout/trainer mismatch; None disables the correction."""
    mutual_learning: bool = True
    """Inter-expert mutual learning on the best expert's correct response."""
    mutual_kind: str = "sequence"
    """sequence (Monte-Carlo KL on O+) or token (full-vocabulary KL along O+)."""
    lambda_kl: float = 1.0
    """lambda1: weight of the mutual-learning term."""
    lambda_sft: float = 1.0
    """lambda2: weight of the hard-example SFT term."""
    sft_aggregation: str = "token_mean"
    """SFT/MEF NLL normalisation: token_mean, seq_mean_token_mean (each sequence weighs the same, so short styles
    are not starved by long ones) or seq_mean_token_sum (the paper's sum of log-probs per sequence)."""
    aux_normaliser: str = "own"
    """What the RIEL step's auxiliary terms (mutual learning with its teacher NLL, hard-example SFT) divide by.
    own: each its own count (pairs; SFT tokens or sequences), so the term weighs lambda times the whole policy term
    however few rows it has. policy: the policy term's normaliser (every GRPO row's tokens or rows, with those left
    out of the batch), so the step is one sum over every scored row divided by one count,
    L = [sum_pg + lambda1 sum_mutual + lambda2 sum_sft] / N_pg, and a transferred or hard-example row weighs lambda
    times a sampled one. Each auxiliary row then adds what a policy row adds under algo.aggregation: under
    token_mean and seq_mean_token_sum its token sum (needs mutual_normalise=sequence and sft_aggregation equal to
    aggregation), under seq_mean_token_mean its token mean (mutual_normalise=token, sft_aggregation
    seq_mean_token_mean); the teacher NLL follows algo.aggregation. Under paper_pg it needs pg_normaliser=all. A
    step without any GRPO row divides by the tokens (rows) of every response generated in the step, and by each
    term's own count if there are none either. The MEF stage (SFT alone) always uses own."""
    mutual_min_gap: float = 0.0
    """Mutual learning pairs only experts whose mean rewards differ by more than this."""
    mutual_normalise: str = "sequence"
    """sequence (the paper: each pair's term sums over the tokens of O+, so long responses weigh more) or token
    (each pair's term is divided by the length of O+: a per-token mean, on the scale of the token-mean PG term)."""
    lambda_kl_warmup_steps: int = 0
    """lambda1 ramps linearly from 0 to lambda_kl over this many RIEL steps (0: full weight from step 1)."""
    mutual_min_student_logprob: Optional[float] = None
    """Transfer filter: a pair trains only when O+'s mean per-token log-prob under the weak prompt P- (this
    step's forward, detached) is at least this, i.e. the weak expert already finds O+ plausible and is not pushed
    into a style it cannot execute. None (the paper) trains every pair."""
    mutual_teacher_nll: float = 0.0
    """Strong-expert protection: weight of -log pi(O+ | Q, P+) (per-token mean per pair, averaged over pairs), so
    shared-weight updates for the weak expert do not lower the strong expert's likelihood of its correct O+.
    0 is the paper."""

    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (algo/dynamic_sampling.py): drop the questions whose K x G rewards are all equal and
    draw further batches until train.problems_per_step informative questions are found."""
    dynamic_sampling_max_gen_batches: int = 3
    """Dynamic sampling: at most this many generation batches (of train.problems_per_step questions) per step."""
    dynamic_sampling_on_exhausted: str = "train"
    """Dynamic sampling, budget spent with too few informative questions: train (on those there are; the
    shortfall is logged as rollout/ds_shortfall) or error (stop, as NeMo-RL, verl and SkyRL do)."""

    def __post_init__(self) -> None:
        checks = (("advantage", ADVANTAGES), ("policy_loss", POLICY_LOSSES), ("aggregation", AGGREGATIONS),
                  ("sft_aggregation", AGGREGATIONS),
                  ("mutual_kind", MUTUAL_KINDS), ("mutual_normalise", MUTUAL_NORMALISE), ("kl_type", KL_TYPES),
                  ("pg_normaliser", PG_NORMALISERS), ("aux_normaliser", AUX_NORMALISERS),
                  ("dynamic_sampling_on_exhausted", ("train", "error")))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"algo.{name} must be one of {allowed}, got '{getattr(self, name)}'")
        if self.dynamic_sampling_max_gen_batches < 1:
            raise ValueError(f"algo.dynamic_sampling_max_gen_batches must be >= 1, got "
                             f"{self.dynamic_sampling_max_gen_batches}")
        if self.num_experts < 1:
            raise ValueError(f"algo.num_experts must be >= 1, got {self.num_experts}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"algo.dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.adv_eps <= 0:
            raise ValueError(f"algo.adv_eps must be > 0, got {self.adv_eps}")
        if self.lambda_kl_warmup_steps < 0:
            raise ValueError(f"algo.lambda_kl_warmup_steps must be >= 0, got {self.lambda_kl_warmup_steps}")
        if self.mutual_teacher_nll < 0:
            raise ValueError(f"algo.mutual_teacher_nll must be >= 0, got {self.mutual_teacher_nll}")
        if self.mutual_min_student_logprob is not None and self.mutual_min_student_logprob > 0:
            raise ValueError("algo.mutual_min_student_logprob is a mean log-prob: it must be <= 0 or null, got "
                             f"{self.mutual_min_student_logprob}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algo.clip_low and algo.clip_high must be >= 0")
        if self.aux_normaliser == "policy":
            self._check_policy_normaliser()

    def _check_policy_normaliser(self) -> None:
        """aux_normaliser=policy: one count must make sense for every term (the field docstring)."""
        if self.policy_loss == "paper_pg" and self.pg_normaliser != "all":
            raise ValueError("algo.aux_normaliser=policy with algo.policy_loss=paper_pg needs algo.pg_normaliser=all: "
                             "with 'scored' the count covers only the rows with A > 0, and is 0 when no answer of "
                             "the step is right (the auxiliary terms would then divide by nothing)")
        mutual, sft = POLICY_UNITS[self.aggregation]
        if self.mutual_learning and self.mutual_normalise != mutual:
            raise ValueError(f"algo.aux_normaliser=policy with algo.aggregation={self.aggregation} needs "
                             f"algo.mutual_normalise={mutual} (got '{self.mutual_normalise}'): each pair must add "
                             "what one policy row adds to the sum that the policy normaliser divides")
        if self.sft_aggregation != sft:
            raise ValueError(f"algo.aux_normaliser=policy with algo.aggregation={self.aggregation} needs "
                             f"algo.sft_aggregation={sft} (got '{self.sft_aggregation}'): each SFT row must add "
                             "what one policy row adds to the sum that the policy normaliser divides")
