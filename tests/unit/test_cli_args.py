"""`meml` argument parsing: options, positionals and key=value overrides in any order."""
from __future__ import annotations

import pytest

from megatron_meml.cli import parse_args


@pytest.mark.parametrize("argv", [
    ["eval", "r.yaml", "--checkpoint", "ck", "eval.max_problems=5", "seed=3"],
    ["eval", "--checkpoint", "ck", "r.yaml", "eval.max_problems=5", "seed=3"],
    ["eval", "r.yaml", "eval.max_problems=5", "--checkpoint", "ck", "seed=3"],
    ["eval", "r.yaml", "eval.max_problems=5", "seed=3", "--checkpoint=ck"],
])
def test_eval_any_order(argv):
    args = parse_args(argv)
    assert (args.cmd, args.recipe, args.checkpoint) == ("eval", "r.yaml", "ck")
    assert args.overrides == ["eval.max_problems=5", "seed=3"]


def test_other_commands_any_order():
    args = parse_args(["plan", "r.yaml", "parallel.tp=2", "--nodes", "2", "--gpus-per-node", "8", "train.steps=3"])
    assert (args.recipe, args.nodes, args.gpus_per_node, args.overrides) == ("r.yaml", 2, 8,
                                                                             ["parallel.tp=2", "train.steps=3"])
    args = parse_args(["compare", "train.steps=2", "--seeds", "1,2", "seed=0", "--only", "MEML-GRPO"])
    assert (args.seeds, args.only, args.overrides) == ("1,2", "MEML-GRPO", ["train.steps=2", "seed=0"])
    args = parse_args(["train", "r.yaml"])
    assert (args.cmd, args.overrides) == ("train", [])


def test_errors_still_reported(capsys):
    with pytest.raises(SystemExit):
        parse_args(["nosuchcmd"])
    with pytest.raises(SystemExit):
        parse_args(["eval", "r.yaml", "--no-such-flag"])
    assert "--no-such-flag" in capsys.readouterr().err
