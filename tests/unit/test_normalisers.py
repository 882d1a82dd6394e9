"""The scale of each loss term: ``algo.aux_normaliser`` (own | policy) and ``algo.pg_normaliser`` (scored | all),
against hand-worked numbers. The step's loss is built as the trainer builds it: ``step_normalisers`` over the
micro-batches, then the sum of ``meml_loss`` over them.

Log-probs are set through the logits: with a vocabulary of 2, label 0 and logits (0, ln(2^k - 1)), a token's
log-prob is -log(1 + 2^k - 1) = -k ln 2. Written below as multiples of c = ln 2 (or of ln 16 where every logit is 0
over a vocabulary of 16)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import megatron_meml
from megatron_meml.algo.advantages import compute_advantages
from megatron_meml.algo.config import AlgoConfig
from megatron_meml.config import load_config
from megatron_meml.experiments.compare import RL_VARIANTS
from megatron_meml.stages.batching import Row, grpo_rows, policy_norm_shares, to_train_batch
from megatron_meml.training.forward_step import (GRPO, SFT, STUDENT, TEACHER, MicroBatch, meml_loss,
                                                 policy_normaliser, step_normalisers)
from megatron_meml.training.packing import split_batch
from megatron_meml.types import Completion, ExpertGroup, Problem

RECIPES = Path(megatron_meml.__file__).parent / "recipes"
C = math.log(2.0)
C16 = math.log(16.0)


def approx(x):
    return pytest.approx(x, rel=1e-6, abs=1e-7)


def _logits(levels: list[int], t: int) -> torch.Tensor:
    """[B, T, 2]: every position of row b gives label 0 the log-prob -levels[b] * ln 2."""
    out = torch.zeros(len(levels), t, 2)
    out[..., 1] = torch.tensor([math.log(2.0 ** k - 1.0) for k in levels])[:, None]
    return out


def _micro(kinds, masks, advantages, *, partner=None, teacher_seq=None) -> MicroBatch:
    mask = torch.tensor(masks, dtype=torch.float32)
    b, t = mask.shape
    return MicroBatch(tokens=torch.zeros(b, t, dtype=torch.long), labels=torch.zeros(b, t, dtype=torch.long),
                      loss_mask=mask, row_kind=torch.tensor(kinds), advantages=torch.tensor(advantages),
                      partner=torch.tensor(partner if partner is not None else [-1] * b),
                      teacher_seq=None if teacher_seq is None else torch.tensor(teacher_seq))


def _step_loss(micro: list[MicroBatch], logits: list[torch.Tensor], algo: AlgoConfig, *, pg_extra=0.0,
               pg_fallback=0.0):
    norm = step_normalisers(micro, algo, pg_extra=pg_extra, pg_fallback=pg_fallback)
    total, metrics = 0.0, {}
    for mb, lg in zip(micro, logits):
        loss, m = meml_loss(lg, mb, norm, algo, None)
        total += float(loss)
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    return total, norm, metrics


# Five rows, T = 5 (log-prob level k of each row in brackets):
#   0 GRPO    A = 0.5, 3 tokens [k=1]: -logp * A = 0.5c per token  -> token sum 1.5c, token mean 0.5c
#   1 GRPO    A = 1.0, 2 tokens [k=2]: 2c per token                 -> token sum 4c,   token mean 2c
#   2 STUDENT weight 1, 2 tokens [k=3], teacher log pi(O+|P+) = -2c given: L = -2c - (2 x -3c) = 4c, or 4c / 2 = 2c
#     per token (mutual_normalise=token)
#   3 SFT     4 tokens [k=1]: NLL sum 4c, mean c
#   4 SFT     1 token  [k=2]: NLL sum 2c, mean 2c
# plus GRPO rows left out of the batch: 5 tokens in 2 rows (pg_extra). lambda1 = 0.5, lambda2 = 0.25.
KINDS = [GRPO, GRPO, STUDENT, SFT, SFT]
MASKS = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 1, 0]]
ADV = [0.5, 1.0, 1.0, 0.0, 0.0]
LEVELS = [1, 2, 3, 1, 2]
TEACHER_SEQ = [0.0, 0.0, -2 * C, 0.0, 0.0]


@pytest.mark.parametrize("aggregation,mutual,sft,aux,extra,norms,loss_c", [
    # N_pg = 5 + 5 = 10 tokens; pairs 1; SFT tokens 5
    # 5.5c/10 + 0.5 x 4c/1 + 0.25 x 6c/5 = 0.55c + 2c + 0.3c
    ("token_mean", "sequence", "token_mean", "own", 5.0, (10, 1, 5), 2.85),
    # one count: 0.55c + 0.5 x 4c/10 + 0.25 x 6c/10 = 0.55c + 0.2c + 0.15c
    ("token_mean", "sequence", "token_mean", "policy", 5.0, (10, 10, 10), 0.9),
    # N_pg = 2 + 2 = 4 rows; pairs 1; SFT rows 2
    # (0.5c + 2c)/4 + 0.5 x 2c/1 + 0.25 x (c + 2c)/2 = 0.625c + c + 0.375c
    ("seq_mean_token_mean", "token", "seq_mean_token_mean", "own", 2.0, (4, 1, 2), 2.0),
    # 0.625c + 0.5 x 2c/4 + 0.25 x 3c/4 = 0.625c + 0.25c + 0.1875c
    ("seq_mean_token_mean", "token", "seq_mean_token_mean", "policy", 2.0, (4, 4, 4), 1.0625),
    # 5.5c/4 + 0.5 x 4c/1 + 0.25 x 6c/2 = 1.375c + 2c + 0.75c
    ("seq_mean_token_sum", "sequence", "seq_mean_token_sum", "own", 2.0, (4, 1, 2), 4.125),
    # 1.375c + 0.5 x 4c/4 + 0.25 x 6c/4 = 1.375c + 0.5c + 0.375c (= the token_mean value x 10/4)
    ("seq_mean_token_sum", "sequence", "seq_mean_token_sum", "policy", 2.0, (4, 4, 4), 2.25),
])
def test_aux_normaliser_hand_worked(aggregation, mutual, sft, aux, extra, norms, loss_c):
    algo = AlgoConfig(aggregation=aggregation, mutual_normalise=mutual, sft_aggregation=sft, aux_normaliser=aux,
                      pg_normaliser="all", lambda_kl=0.5, lambda_sft=0.25)
    mb = _micro(KINDS, MASKS, ADV, teacher_seq=TEACHER_SEQ)
    loss, norm, m = _step_loss([mb], [_logits(LEVELS, 5)], algo, pg_extra=extra)
    assert (norm.pg, norm.pairs, norm.sft) == norms
    assert loss == approx(loss_c * C)
    assert m["train/loss"] == approx(loss_c * C)


def test_policy_token_mean_and_sequence_sum_differ_by_the_mean_length():
    """Under policy, token_mean and seq_mean_token_sum share the numerator (every term's token sums) and differ by
    the normaliser only: 0.9c x 10 tokens = 2.25c x 4 rows = 9c, the step's sum (docs/method.md)."""
    mb = _micro(KINDS, MASKS, ADV, teacher_seq=TEACHER_SEQ)
    tok = AlgoConfig(aux_normaliser="policy", pg_normaliser="all", lambda_kl=0.5, lambda_sft=0.25)
    seq = dataclasses.replace(tok, aggregation="seq_mean_token_sum", sft_aggregation="seq_mean_token_sum")
    a, na, _ = _step_loss([mb], [_logits(LEVELS, 5)], tok, pg_extra=5.0)
    b, nb, _ = _step_loss([mb], [_logits(LEVELS, 5)], seq, pg_extra=2.0)
    assert a * na.pg == approx(b * nb.pg) and a * na.pg == approx(9 * C)


def test_aux_terms_metrics_are_their_share_of_the_loss():
    """Under policy (token_mean) train/mutual_kl and train/sft_nll are the terms before lambda over N_pg = 10:
    4c/10 and 6c/10; the policy term is the same under both settings (5.5c/10)."""
    mb = _micro(KINDS, MASKS, ADV, teacher_seq=TEACHER_SEQ)
    algo = AlgoConfig(aux_normaliser="policy", pg_normaliser="all")
    _, _, m = _step_loss([mb], [_logits(LEVELS, 5)], algo, pg_extra=5.0)
    _, _, own = _step_loss([mb], [_logits(LEVELS, 5)], dataclasses.replace(algo, aux_normaliser="own"),
                           pg_extra=5.0)
    assert m["train/mutual_kl"] == approx(0.4 * C) and m["train/sft_nll"] == approx(0.6 * C)
    assert own["train/mutual_kl"] == approx(4 * C) and own["train/sft_nll"] == approx(1.2 * C)
    assert m["train/pg_loss"] == own["train/pg_loss"] == approx(0.55 * C)


def test_split_into_micro_batches_gives_the_same_step():
    """The normalisers are counted over the whole step: rows 0-1 and rows 2-4 as two micro-batches give the
    token_mean/policy value above, 0.9c."""
    algo = AlgoConfig(aux_normaliser="policy", pg_normaliser="all", lambda_kl=0.5, lambda_sft=0.25)
    a = _micro(KINDS[:2], MASKS[:2], ADV[:2])
    b = _micro(KINDS[2:], MASKS[2:], ADV[2:], teacher_seq=TEACHER_SEQ[2:])
    loss, norm, _ = _step_loss([a, b], [_logits(LEVELS[:2], 5), _logits(LEVELS[2:], 5)], algo, pg_extra=5.0)
    assert norm.pairs == 10 and loss == approx(0.9 * C)


@pytest.mark.parametrize("aux,loss_c", [
    # rows: 0 GRPO A = 1, 2 tokens [k=1]: pg token sum 2c; 1 STUDENT 2 tokens [k=3]; 2 TEACHER (its partner) 2 tokens
    # [k=1]: L = -2c + 6c = 4c; teacher NLL token sum 2c, per-token mean c. N_pg = 2, pairs 1; lambda1 = 1, 0.4 NLL.
    ("own", 2 / 2 + 4 / 1 + 0.4 * 1 / 1),     # c + 4c + 0.4c (the NLL a per-token mean per pair)
    ("policy", 2 / 2 + 4 / 2 + 0.4 * 2 / 2),  # c + 2c + 0.4c (under token_mean the NLL is a token sum, over N_pg)
])
def test_teacher_nll_follows_the_policy_aggregation(aux, loss_c):
    algo = AlgoConfig(aux_normaliser=aux, pg_normaliser="all", mutual_teacher_nll=0.4)
    mb = _micro([GRPO, STUDENT, TEACHER], [[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]], [1.0, 1.0, 0.0],
                partner=[-1, 2, -1])
    loss, _, _ = _step_loss([mb], [_logits([1, 3, 1], 4)], algo)
    assert loss == approx(loss_c * C)


def test_policy_normaliser_without_grpo_rows():
    """A step with no GRPO token divides the auxiliary terms by every generated response (the fallback), and by
    their own counts when there is none either, never by a floor of 1."""
    algo = AlgoConfig(aux_normaliser="policy", pg_normaliser="all")
    sft_only = _micro([SFT], [[1, 1, 1, 0]], [0.0])  # 3 SFT tokens
    assert policy_normaliser(7.0, 12.0) == 7.0 and policy_normaliser(0.0, 12.0) == 12.0
    norm = step_normalisers([sft_only], algo, pg_fallback=12.0)
    assert (norm.pg, norm.pairs, norm.sft, norm.scored) == (1.0, 12.0, 12.0, 3.0)
    norm = step_normalisers([sft_only], algo)
    assert (norm.pairs, norm.sft) == (1.0, 3.0)  # no pair: the floor; the SFT term its own 3 tokens
    # with any GRPO token (here only rows left out) the fallback is not read
    assert step_normalisers([sft_only], algo, pg_extra=5.0, pg_fallback=12.0).sft == 5.0
    assert step_normalisers([sft_only], dataclasses.replace(algo, aux_normaliser="own"), pg_fallback=12.0).sft == 3.0


def _groups(rewards: list[tuple], lengths: list[tuple]) -> list[ExpertGroup]:
    def group(r, n):
        # the engine's log-probs equal the trainer's (-ln 16): importance weights 1
        outs = [Completion(prompt_ids=[1, 2], token_ids=list(range(5, 5 + k)), text="", logprobs=[-C16] * k,
                           finish_reason="stop") for k in n]
        return ExpertGroup(problem=Problem(id="q", question="q", answer="1"), expert=0, completions=outs,
                           rewards=list(r))
    return [group(r, n) for r, n in zip(rewards, lengths)]


# Two groups of G = 4 under the paper's advantages A = max(r - mean, 0):
#   rewards (1, 0, 0, 0), response lengths (2, 3, 1, 4): A = (0.75, 0, 0, 0)
#   rewards (1, 1, 0, 0), response lengths (2, 2, 3, 3): A = (0.5, 0.5, 0, 0)
# Rows trained: 3 of 2 tokens each. Every logit 0 over 16 tokens: -log p = ln 16 =: c16 at every token.
# Policy numerator: token sums 0.75 x 2c16 + 0.5 x 2c16 + 0.5 x 2c16 = 3.5 c16; row means 0.75 + 0.5 + 0.5 = 1.75 c16.
# Left out (A = 0): tokens 3 + 1 + 4 + 3 + 3 = 14 in 5 rows; every response: 20 tokens in 8 rows.
GROUP_REWARDS = [(1.0, 0.0, 0.0, 0.0), (1.0, 1.0, 0.0, 0.0)]
GROUP_LENGTHS = [(2, 3, 1, 4), (2, 2, 3, 3)]


def _chain(algo: AlgoConfig, groups, generated, extra_rows=(), micro_batch_size=2):
    """groups -> rows and shares (as the RIEL step builds them) -> micro-batches -> the step's loss."""
    adv = compute_advantages(torch.tensor([g.rewards for g in groups]), algo) if groups else torch.zeros(0, 4)
    rows = grpo_rows(groups, adv, positive_only=algo.policy_loss == "paper_pg") + list(extra_rows)
    extra, fallback = policy_norm_shares(groups, generated, adv, algo, skip_zero=False)
    batch = to_train_batch(rows, 0, pg_norm_extra=extra, pg_norm_fallback=fallback)
    micro, _ = split_batch(batch, micro_batch_size, 0)
    logits = [torch.zeros(*mb.tokens.shape, 16) for mb in micro]
    loss, norm, _ = _step_loss(micro, logits, algo, pg_extra=batch.pg_norm_extra, pg_fallback=batch.pg_norm_fallback)
    return loss, norm, (extra, fallback)


@pytest.mark.parametrize("aggregation,pg_normaliser,shares,n_pg,loss_c16", [
    ("token_mean", "scored", (0.0, 0.0), 6, 3.5 / 6),        # the 6 tokens trained
    ("token_mean", "all", (14.0, 0.0), 20, 3.5 / 20),        # every response's 20 tokens
    ("seq_mean_token_mean", "scored", (0.0, 0.0), 3, 1.75 / 3),
    ("seq_mean_token_mean", "all", (5.0, 0.0), 8, 1.75 / 8),
    ("seq_mean_token_sum", "all", (5.0, 0.0), 8, 3.5 / 8),
])
def test_pg_normaliser_hand_worked(aggregation, pg_normaliser, shares, n_pg, loss_c16):
    algo = AlgoConfig(aggregation=aggregation, pg_normaliser=pg_normaliser, mutual_learning=False)
    groups = _groups(GROUP_REWARDS, GROUP_LENGTHS)
    loss, norm, got_shares = _chain(algo, groups, groups)
    assert got_shares == shares and norm.pg == n_pg and norm.pg_present == (6 if aggregation == "token_mean" else 3)
    assert loss == approx(loss_c16 * C16)


SFT_ROW = Row(tokens=[1, 2, 3, 4, 5], loss_mask=[0.0, 1.0, 1.0, 1.0, 0.0], kind=SFT)
"""Three SFT target tokens: NLL sum 3 c16."""


def test_all_wrong_step_divides_sft_by_every_response():
    """paper_pg, every answer wrong: no GRPO row is built; under pg_normaliser=all with aux_normaliser=policy the
    20 tokens of the 8 responses are the count, so the SFT term is 3c16/20 (not 3c16 / 1, nor the own mean c16)."""
    algo = AlgoConfig(aux_normaliser="policy", pg_normaliser="all", mutual_learning=False)
    wrong = _groups([(0.0,) * 4, (0.0,) * 4], GROUP_LENGTHS)
    loss, norm, shares = _chain(algo, wrong, wrong, extra_rows=[SFT_ROW])
    assert shares == (20.0, 20.0) and norm.sft == 20.0
    assert loss == approx(3 * C16 / 20)
    own, _, _ = _chain(dataclasses.replace(algo, aux_normaliser="own"), wrong, wrong, extra_rows=[SFT_ROW])
    assert own == approx(C16)


def test_step_without_kept_groups_divides_by_the_generated_responses():
    """Dynamic sampling kept no question (every group all-equal): no GRPO row and no left-out row, so the SFT term
    divides by the generated responses' 20 tokens (``pg_norm_fallback``)."""
    algo = AlgoConfig(aux_normaliser="policy", pg_normaliser="all", mutual_learning=False)
    dropped = _groups([(0.0,) * 4, (1.0,) * 4], GROUP_LENGTHS)
    loss, norm, shares = _chain(algo, [], dropped, extra_rows=[SFT_ROW])
    assert shares == (0.0, 20.0) and norm.sft == 20.0 and norm.pg == 1.0
    assert loss == approx(3 * C16 / 20)


@pytest.mark.parametrize("recipe", [None, *sorted(p.name for p in RECIPES.glob("*.yaml") if not p.stem.endswith("-mef"))])
def test_paper_norm_variant_loads_over_every_rl_recipe(recipe):
    """``meml compare``'s MEML-GRPO-paper-norm row: valid over every shipped RL recipe (whatever its aggregation
    and mutual levers), and exactly the paper's normalisation."""
    cfg = load_config(RECIPES / recipe if recipe else None, RL_VARIANTS["MEML-GRPO-paper-norm"]).algo
    assert (cfg.policy_loss, cfg.advantage, cfg.pg_normaliser, cfg.aux_normaliser) == ("paper_pg", "paper", "all",
                                                                                       "policy")
    assert (cfg.aggregation, cfg.mutual_normalise, cfg.sft_aggregation) == ("token_mean", "sequence", "token_mean")
    assert cfg.lambda_kl_warmup_steps == 0 and cfg.mutual_min_student_logprob is None and cfg.mutual_teacher_nll == 0
