"""`meml compare` argument handling: extra variants, --only, and bad input caught before any run starts."""
from __future__ import annotations

import pytest

from megatron_meml.compare import PAPER_MUTUAL, RL_VARIANTS, parse_variant, run_compare
from megatron_meml.config import load_config


def test_parse_variant():
    assert parse_variant("MEML-tok: algo.mutual_normalise=token  algo.lambda_kl=0.5") == (
        "MEML-tok", ["algo.mutual_normalise=token", "algo.lambda_kl=0.5"])
    for bad in ("no colon", ": algo.lambda_kl=1", "Two words: algo.lambda_kl=1", "MoE-SFT: algo.lambda_kl=1"):
        with pytest.raises(ValueError, match="expected 'NAME: key=value"):
            parse_variant(bad)
    with pytest.raises(ValueError, match="'algo.lambda_kl' is not a key=value"):
        parse_variant("X: algo.lambda_kl")


def test_paper_variant_resets_every_mutual_lever():
    cfg = load_config(None, ["algo.mutual_normalise=token", "algo.lambda_kl_warmup_steps=5",
                             "algo.mutual_min_student_logprob=-1.5", "algo.mutual_teacher_nll=0.5", *PAPER_MUTUAL])
    default = load_config(None, [])
    assert cfg.algo == default.algo
    assert RL_VARIANTS["MEML-GRPO-paper"] == PAPER_MUTUAL


@pytest.mark.parametrize("kwargs,message", [
    ({"variants": ["X: algo.no_such_key=1"]}, "no_such_key"),
    ({"only": ["MEML-GRPO", "Nope"]}, "--only: unknown variant(s) ['Nope']"),
])
def test_bad_compare_input_fails_before_running(tmp_path, capsys, kwargs, message):
    assert run_compare(None, [], [1], str(tmp_path / "cmp"), **kwargs) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_final_eval_columns(tmp_path):
    import json

    from megatron_meml.compare import REWARD_WINDOW, _final_eval

    ev = {"stage": "eval", "step": 12, "eval/synthetic/a/accuracy": 0.2, "eval/synthetic/b/accuracy": 0.3,
          "eval/synthetic/c/accuracy": 0.5, "eval/synthetic/best_expert/accuracy": 0.5}
    train = [{"stage": "train", "step": s, "expert/a/reward_mean": 0.1,
              "expert/b/reward_mean": 0.9 if s > 12 - REWARD_WINDOW else 0.0,   # b leads over the window
              "expert/c/reward_mean": 0.5 if s > 12 - REWARD_WINDOW else 5.0} for s in range(1, 13)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [*train, ev]))
    assert _final_eval(tmp_path, "a") == {"acc_expert0": 0.2, "acc_best_expert": 0.5, "acc_reward_best": 0.3}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ev))  # an SFT row: no training reward, no column
    assert _final_eval(tmp_path, "a") == {"acc_expert0": 0.2, "acc_best_expert": 0.5}
