"""GRPO rows from groups: which rows stay out (the paper's positive part, the clipped loss's zero advantages)
and the share of the normaliser the left-out zero rows keep, against hand-counted numbers."""
from __future__ import annotations

import torch

from megatron_meml.algo.advantages import grpo_advantages
from megatron_meml.stages.batching import grpo_rows, left_out_share, to_train_batch
from megatron_meml.types import Completion, ExpertGroup, Problem


def _groups():
    """Two groups of 3: rewards (1, 0, 0) and (1, 1, 1); responses of 2, 3 and 4 tokens; the second group's
    middle response is empty (an engine may return none: no row)."""
    def group(rewards, lengths):
        outs = [Completion(prompt_ids=[1, 2], token_ids=list(range(5, 5 + n)), text="", logprobs=[-0.5] * n,
                           finish_reason="stop") for n in lengths]
        return ExpertGroup(problem=Problem(id="q", question="q", answer="1"), expert=0, completions=outs,
                           rewards=list(rewards))
    return [group((1.0, 0.0, 0.0), (2, 3, 4)), group((1.0, 1.0, 1.0), (2, 0, 4))]


def test_zero_rows_left_out_and_their_share_kept():
    groups = _groups()
    adv = grpo_advantages(torch.tensor([g.rewards for g in groups]), eps=1e-6)
    assert adv[1].eq(0).all() and adv[0].ne(0).all()
    every = grpo_rows(groups, adv, positive_only=False)
    kept = grpo_rows(groups, adv, positive_only=False, skip_zero=True)
    assert [len(r.tokens) for r in every] == [4, 5, 6, 4, 6]  # prompt 2 + response; the empty one has no row
    assert [len(r.tokens) for r in kept] == [4, 5, 6]
    flags = dict(positive_only=False, skip_zero=True)
    assert left_out_share(groups, adv, "token_mean", **flags) == 2 + 4  # the scored tokens of the two zero rows
    assert left_out_share(groups, adv, "seq_mean_token_mean", **flags) == 2
    assert left_out_share(groups, adv, "seq_mean_token_sum", **flags) == 2
    positive = grpo_rows(groups, adv, positive_only=True)
    assert [r.advantage > 0 for r in positive] == [True]
    # the paper's loss leaves out every row with A <= 0: (0, 3 and 4 tokens) of group 1, (2, 4) of group 2
    flags = dict(positive_only=True, skip_zero=False)
    assert left_out_share(groups, adv, "token_mean", **flags) == 3 + 4 + 2 + 4
    assert left_out_share(groups, adv, "seq_mean_token_sum", **flags) == 4
    batch = to_train_batch(kept, 0, pg_norm_extra=6.0)
    assert batch.pg_norm_extra == 6.0 and batch.num_rows == 3
    assert float(batch.loss_mask.sum()) + 6.0 == sum(float(m.sum()) for m in to_train_batch(every, 0).loss_mask)
