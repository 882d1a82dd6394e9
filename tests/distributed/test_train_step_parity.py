"""A whole MEML train step (GRPO + mutual-learning pairs + SFT rows in one batch) gives the same parameter
gradients at TP=2, PP=2 and DP=2 as one process, and the same with 1 or several micro-batches, padded by row count
or packed padding-free by token budget (fp32, 1e-5 absolute; gradients here are O(1e-2..1)). The single-process
reference runs the output layer on every position, the steps under test on the scored positions only."""
from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.megatron_models import init_parallel, load_model, save_model, tiny_arch, tiny_model_config

pytestmark = pytest.mark.distributed
TOL = 1e-5
T, PAD = 14, 0
LAYERS = tiny_model_config().num_layers


def mixed_batch(algo_kind: str):
    """4 GRPO rows, 2 mutual-learning pairs, 2 SFT rows (teacher rows placed away from their students). For a
    ``*_shared`` kind, GRPO rows 2, 5 and 8 have the same prompt (the samples of one group), and so do GRPO row 0
    and SFT row 3."""
    from megatron_meml.training.forward_step import GRPO, SFT, STUDENT, TEACHER
    from megatron_meml.types import TrainBatch

    g = torch.Generator().manual_seed(3)
    kinds = [GRPO, STUDENT, GRPO, SFT, STUDENT, GRPO, TEACHER, SFT, GRPO, TEACHER]
    pair = [-1, 0, -1, -1, 1, -1, 1, -1, -1, 0]
    b = len(kinds)
    tokens = torch.randint(1, 64, (b, T), generator=g)
    mask = torch.zeros(b, T)
    for r in range(b):
        start = 3 + r % 3
        mask[r, start:T - 1 - r % 2] = 1.0
    for s, t in ((1, 9), (4, 6)):  # a pair scores the same response O+ after different prompts
        n = int(mask[s].sum())
        mask[t] = 0.0
        mask[t, 2:2 + n] = 1.0
        tokens[t, 3:3 + n] = tokens[s, mask[s].nonzero()[:, 0] + 1]
    if algo_kind.endswith("_shared"):  # a prompt is the tokens up to and including the first scored position
        tokens[[5, 8], :6] = tokens[2, :6]
        tokens[3, :4] = tokens[0, :4]
    adv = torch.tensor([0.75, 1.0, -0.5, 0, 0.5, 0.25, 0, 0, 1.0, 0])  # students: scheduled pair weights
    old = -torch.rand(b, T, generator=g) * 3
    rollout = old + 0.05 * torch.randn(b, T, generator=g)
    return TrainBatch(tokens=tokens, loss_mask=mask, row_kind=torch.tensor(kinds), advantages=adv,
                      old_logprobs=old, rollout_logprobs=rollout, pair_id=torch.tensor(pair))


def _algo(algo_kind):
    from megatron_meml.algo.config import AlgoConfig

    if algo_kind == "paper":
        return AlgoConfig(lambda_kl=0.7, lambda_sft=0.3)
    assert algo_kind in ("clipped_token", "clipped_token_shared"), algo_kind
    return AlgoConfig(policy_loss="clipped", clip_low=0.1, clip_high=0.3, mutual_kind="token",
                      aggregation="seq_mean_token_mean", lambda_kl=0.7, lambda_sft=0.3, mutual_normalise="token",
                      mutual_teacher_nll=0.4, mutual_min_student_logprob=-50.0)


def _grads(tmp, algo_kind, tp, pp, dp_rank, dp, mbs, ahead=True, tokens=0, scored_only=True):
    """Build at (tp, pp), load the reference weights, run one train step; return {global name: grad}."""
    from megatron.core import parallel_state as ps
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.model.provider import unwrap
    from megatron_meml.training.setup import setup_training
    from megatron_meml.training.packing import pack_rows
    from megatron_meml.training.trainer import Trainer
    from megatron_meml.types import TrainBatch

    init_parallel(tp, pp)
    par = ParallelConfig(tp=tp, pp=pp, distributed_optimizer=False)
    state = setup_training(tiny_arch(), tiny_model_config(), par, TrainConfig(grad_clip=0.0), lr=1e-3)
    load_model(unwrap(state.model[0]), f"{tmp}/ckpt")
    batch = mixed_batch(algo_kind)
    if dp > 1:  # units (pairs kept together) dealt round-robin to DP ranks
        units = pack_rows(batch.row_kind, batch.pair_id, 2)
        rows = sorted(r for i, u in enumerate(units) if i % dp == dp_rank for r in u)
        batch = TrainBatch(tokens=batch.tokens[rows], loss_mask=batch.loss_mask[rows],
                           row_kind=batch.row_kind[rows], advantages=batch.advantages[rows],
                           old_logprobs=batch.old_logprobs[rows], rollout_logprobs=batch.rollout_logprobs[rows],
                           pair_id=batch.pair_id[rows])
    share = bool(tokens) and algo_kind.endswith("_shared")
    trainer = Trainer(state, _algo(algo_kind), micro_batch_size=mbs, pad_id=PAD, score_teachers_ahead=ahead,
                      max_tokens_per_micro_batch=tokens, logits_at_scored_only=scored_only, share_prompts=share)
    if tokens:  # the budget must really split the step (else the test could not tell packing from one batch)
        from megatron_meml.training.packing import split_packed

        micro = split_packed(batch, tokens, PAD, fixed=pp > 1, share_prompts=share)[0]
        assert len(micro) >= 2
        # and shared prompts must really be shared (under DP=2 rank 1's rows have no prompt in common)
        assert share == any(mb.packed.prefix_of is not None for mb in micro) or dp_rank > 0
    metrics = trainer.train_step(batch)
    offset = ps.get_pipeline_model_parallel_rank() * (LAYERS // pp)
    out = {}
    for name, p in unwrap(state.model[0]).named_parameters():
        if name.startswith("decoder.layers."):
            parts = name.split(".")
            parts[2] = str(int(parts[2]) + offset)
            name = ".".join(parts)
        out[name] = (p.main_grad.clone(), p)
    return out, metrics


def _full_shard(name, full, param, tp, rank):
    """The slice of a TP=1 tensor that TP rank ``rank`` holds (fc1 = [gate_r; up_r])."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    return full.chunk(tp, dim=dim)[rank]


def _reference(rank, world, tmp, algo_kind):
    from megatron_meml.model.provider import build_model

    par = init_parallel(1, 1)
    save_model(build_model(tiny_arch(), tiny_model_config(), par), f"{tmp}/ckpt")
    torch.distributed.barrier()
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    grads, metrics = _grads(tmp, algo_kind, 1, 1, 0, 1, mbs=10, scored_only=False)  # logits at every position
    torch.save({"grads": {k: g for k, (g, _) in grads.items()}, "metrics": metrics}, f"{tmp}/ref_{algo_kind}.pt")


def _check(rank, world, tmp, algo_kind, tp, pp, dp, mbs, tokens=0):
    from megatron.core import parallel_state as ps

    dp_rank = rank // (tp * pp) if dp > 1 else 0
    grads, metrics = _grads(tmp, algo_kind, tp, pp, dp_rank, dp, mbs, tokens=tokens)
    ref = torch.load(f"{tmp}/ref_{algo_kind}.pt", weights_only=True)
    tp_rank = ps.get_tensor_model_parallel_rank()
    assert grads, "no parameters on this rank"
    for name, (g, p) in grads.items():
        want = _full_shard(name, ref["grads"][name], p, tp, tp_rank)
        assert want.abs().max() > 0 or name.endswith("bias"), f"reference grad of {name} is zero"
        torch.testing.assert_close(g, want, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
    keys = ["train/loss", "train/pg_loss", "train/mutual_kl", "train/sft_nll", "train/mutual_active_pairs"]
    if algo_kind != "paper":
        keys.append("train/mutual_teacher_nll")
    assert ref["metrics"]["train/mutual_active_pairs"] == 2.0
    for key in keys:
        assert abs(metrics[key] - ref["metrics"][key]) <= TOL, (key, metrics[key], ref["metrics"][key])


_REFS: dict = {}


def _reference_dir(tmp_path_factory, algo_kind: str) -> str:
    if algo_kind not in _REFS:
        tmp = str(tmp_path_factory.mktemp(f"step_ref_{algo_kind}"))
        run_distributed(_reference, 1, tmp, algo_kind, megatron=True)
        _REFS[algo_kind] = tmp
    return _REFS[algo_kind]


@pytest.fixture(scope="module", params=["paper", "clipped_token"])
def reference(request, tmp_path_factory):
    return _reference_dir(tmp_path_factory, request.param), request.param


@pytest.mark.parametrize("tp,pp,dp,mbs,tokens", [
    (1, 1, 1, 3, 0), (2, 1, 1, 10, 0), (1, 2, 1, 3, 0), (1, 1, 2, 3, 0), (1, 1, 1, 8, 30)],
    ids=["microbatches4", "tp2", "pp2", "dp2", "packed"])
def test_train_step_gradients_match_single_process(reference, tp, pp, dp, mbs, tokens):
    """Against the single-process step with one padded micro-batch of all 10 rows (paper: teachers scored ahead,
    so packing puts students without their teachers; clipped_token: pairs packed together)."""
    tmp, algo_kind = reference
    run_distributed(_check, tp * pp * dp, tmp, algo_kind, tp, pp, dp, mbs, tokens, megatron=True)


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["packed_tp2", "packed_pp2", "packed_dp2"])
def test_packed_train_step_gradients_match_single_process(tmp_path_factory, tp, pp, dp):
    """Packed by a 30-token budget (several micro-batches; fixed length under PP) at TP=2, PP=2, DP=2, with the
    token-level mutual KL (its positions go through the packed stream) against the padded single-process step."""
    tmp = _reference_dir(tmp_path_factory, "clipped_token")
    run_distributed(_check, tp * pp * dp, tmp, "clipped_token", tp, pp, dp, 8, 30, megatron=True)


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["shared_tp2", "shared_pp2", "shared_dp2"])
def test_shared_prompt_train_step_gradients_match_single_process(tmp_path_factory, tp, pp, dp):
    """train.share_prompts: packed by a 30-token budget with rows of one prompt sharing one copy of it (each
    response attends to the prompt sequence, at RoPE positions continuing it) at TP=2, PP=2, DP=2, against the
    padded single-process step on the same rows, every row with its own prompt."""
    tmp = _reference_dir(tmp_path_factory, "clipped_token_shared")
    run_distributed(_check, tp * pp * dp, tmp, "clipped_token_shared", tp, pp, dp, 8, 30, megatron=True)


def _teachers_ahead(rank, world, tmp):
    """The paper's sequence KL with the teachers scored by a no-grad forward before the step (the default) gives
    the in-batch teacher rows' gradients and metrics, with 3 micro-batches (pairs then split from teachers)."""
    from megatron_meml.model.provider import build_model
    from megatron_meml.training.trainer import teacher_ahead
    from megatron.core import parallel_state as ps

    assert teacher_ahead(_algo("paper")) and not teacher_ahead(_algo("clipped_token"))
    par = init_parallel(1, 1)
    save_model(build_model(tiny_arch(), tiny_model_config(), par), f"{tmp}/ckpt")
    ps.destroy_model_parallel()
    inline, m_inline = _grads(tmp, "paper", 1, 1, 0, 1, mbs=3, ahead=False)
    ps.destroy_model_parallel()
    ahead, m_ahead = _grads(tmp, "paper", 1, 1, 0, 1, mbs=3, ahead=True)
    for name, (g, _) in inline.items():
        assert g.abs().max() > 0 or name.endswith("bias"), name
        torch.testing.assert_close(ahead[name][0], g, atol=TOL, rtol=0, msg=lambda m: f"{name}: {m}")
    assert m_inline["train/mutual_active_pairs"] == 2.0
    for key in ("train/loss", "train/pg_loss", "train/mutual_kl", "train/sft_nll", "train/mutual_active_pairs"):
        assert abs(m_ahead[key] - m_inline[key]) <= TOL, (key, m_ahead[key], m_inline[key])


def test_teachers_scored_ahead_match_in_batch_teachers(tmp_path):
    run_distributed(_teachers_ahead, 1, str(tmp_path), megatron=True)


def _empty_step(rank, world, tmp):
    """A batch that scores nothing on any DP rank runs no forward, backward or AdamW update (AdamW on a zero
    gradient would still move the weights along its momentum): weights unchanged after a real step built momentum."""
    from megatron_meml.stages.batching import to_train_batch
    from megatron_meml.model.provider import unwrap
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import setup_training
    from megatron_meml.training.forward_step import GRPO
    from megatron_meml.training.trainer import Trainer

    par = init_parallel(1, 1)
    state = setup_training(tiny_arch(), tiny_model_config(), par, TrainConfig(grad_clip=0.0), lr=1e-2)
    trainer = Trainer(state, _algo("paper"), micro_batch_size=4, pad_id=PAD)
    assert trainer.train_step(mixed_batch("paper"))["train/empty_step"] == 0.0
    before = {n: p.detach().clone() for n, p in unwrap(state.model[0]).named_parameters()}
    mine = mixed_batch("paper") if rank == 0 else to_train_batch([], PAD)
    if rank == 0:  # rows, none scored (a pair would count: pairs are counted by student rows)
        mine.loss_mask.zero_()
        mine.row_kind.fill_(GRPO)
    metrics = trainer.train_step(mine)
    assert metrics["train/empty_step"] == 1.0 and metrics["train/update_skipped"] == 1.0
    for n, p in unwrap(state.model[0]).named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_empty_step_changes_nothing_dp2(tmp_path):
    run_distributed(_empty_step, 2, str(tmp_path), megatron=True)


def _checkpoint_before_any_update(rank, world, tmp):
    """A checkpoint after steps that were all empty (dynamic sampling on a model that solves nothing, stopped by
    its rollout budget) saves the model without optimizer state (there is none yet: Megatron's state_dict() of an
    AdamW that never stepped fails an assertion) and resumes into a fresh optimizer."""
    import json
    from pathlib import Path

    from megatron_meml.training.checkpoint import load_checkpoint, save_checkpoint
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import setup_training

    par = init_parallel(1, 1)
    state = setup_training(tiny_arch(), tiny_model_config(), par, TrainConfig(grad_clip=0.0), lr=1e-2)
    out = save_checkpoint(Path(tmp), 1, state, {"completions": 48})
    rs = json.loads((out / "run_state.json").read_text())
    assert rs["with_optimizer"] is False and rs["completions"] == 48
    assert load_checkpoint(out, state)["step"] == 1


def test_checkpoint_before_any_optimizer_step(tmp_path):
    run_distributed(_checkpoint_before_any_update, 1, str(tmp_path), megatron=True)
