"""Evaluation with a dev split: the test and dev problems go to the engine in one generation, the test problems keep
their metric names and file, the dev problems get ``eval/dev/...`` and ``eval/step_<N>.dev.jsonl``."""
from __future__ import annotations

from pathlib import Path

from megatron_meml.config import MemlConfig
from megatron_meml.reporting.config import LoggingConfig
from megatron_meml.reporting.metrics import MetricsLogger, PhaseTimers, read_metrics
from megatron_meml.reporting.samples import eval_file, read_eval_problems
from megatron_meml.experts.expert_set import synthetic_expert_set
from megatron_meml.stages.config import EvalConfig
from megatron_meml.stages.context import RunContext, StopFlag
from megatron_meml.stages.evaluate import evaluate
from megatron_meml.stages.paths import RunPaths
from megatron_meml.types import Completion, Problem


class _Engine:
    """Answers each prompt with the text the test chose for its (expert, problem); records every call."""

    def __init__(self, answers: dict[tuple[int, ...], str]) -> None:
        self.answers, self.calls = answers, []

    def generate(self, prompts, spec):
        self.calls.append((len(prompts), spec.temperature))
        return [Completion(prompt_ids=list(p), token_ids=[5], text=self.answers[tuple(p)], logprobs=[0.0],
                           finish_reason="stop") for p in prompts for _ in range(spec.n)]


def _problems(split: str, n: int) -> list[Problem]:
    return [Problem(id=f"{split}{i}", question=f"{i} + {split == 'dev':d} = ?", answer=str(i + (split == "dev")))
            for i in range(n)]


def test_dev_problems_are_evaluated_with_the_test_problems_and_reported_apart(tmp_path: Path):
    cfg = MemlConfig(eval=EvalConfig(pass_k=0), logging=LoggingConfig(tensorboard=False, samples_per_step=2))
    experts = synthetic_expert_set(cfg.experts, 3)
    test, dev = _problems("test", 4), _problems("dev", 5)
    # test: expert e right on the first e+1 problems; dev: only expert 2 right, on every problem
    right = {(e, p.id): i <= e for e in range(3) for i, p in enumerate(test)}
    right |= {(e, p.id): e == 2 for e in range(3) for p in dev}
    engine = _Engine({tuple(experts.prompt_ids(e, p)): f"#### {p.answer if right[e, p.id] else -1}"
                      for e in range(3) for p in test + dev})
    ctx = RunContext(cfg=cfg, paths=RunPaths(tmp_path), arch=None, experts=experts, train_problems=[],
                     eval_problems=test,
                     dev_problems=dev, state=None, trainer=None, rollout=engine,
                     logger=MetricsLogger(tmp_path, cfg.logging), timers=PhaseTimers(), stop=StopFlag(), dp_rank=0,
                     dp_size=1, rank=0)
    m = evaluate(ctx, 3)
    assert engine.calls == [(3 * 9, 0.0)]  # one greedy generation for both splits
    ids = experts.ids
    assert [m[f"eval/synthetic/{e}/accuracy"] for e in ids] == [0.25, 0.5, 0.75]
    assert [m[f"eval/dev/{e}/accuracy"] for e in ids] == [0.0, 0.0, 1.0]
    assert m["eval/num_problems"] == 4 and m["eval/num_dev_problems"] == 5
    assert m["eval/dev/best_expert/accuracy"] == 1.0 and m["eval/synthetic/best_expert/accuracy"] == 0.75
    assert not any(k.startswith("eval/dev/") and "format" in k for k in m)
    ctx.logger.close()
    assert read_metrics(tmp_path)[-1][f"eval/dev/{ids[2]}/accuracy"] == 1.0
    on_test = read_eval_problems(eval_file(tmp_path, 3))
    on_dev = read_eval_problems(eval_file(tmp_path, 3, "dev"))
    assert [p.problem_id for p in on_test] == [p.id for p in test]
    assert [p.problem_id for p in on_dev] == [p.id for p in dev]
    assert [p.rewards[ids[2]] for p in on_dev] == [1.0] * 5 and [p.rewards[ids[0]] for p in on_test] == [1, 0, 0, 0]
    assert eval_file(tmp_path, 3, "dev").name == "step_3.dev.jsonl"


def test_without_dev_problems_nothing_changes(tmp_path: Path):
    cfg = MemlConfig(eval=EvalConfig(pass_k=0), logging=LoggingConfig(tensorboard=False, samples_per_step=0))
    experts = synthetic_expert_set(cfg.experts, 2)
    test = _problems("test", 3)
    engine = _Engine({tuple(experts.prompt_ids(e, p)): f"#### {p.answer}" for e in range(2) for p in test})
    ctx = RunContext(cfg=cfg, paths=RunPaths(tmp_path), arch=None, experts=experts, train_problems=[],
                     eval_problems=test,
                     state=None, trainer=None, rollout=engine, logger=MetricsLogger(tmp_path, cfg.logging),
                     timers=PhaseTimers(), stop=StopFlag(), dp_rank=0, dp_size=1, rank=0)
    m = evaluate(ctx, 1)
    assert engine.calls == [(6, 0.0)]
    assert not any("dev" in k for k in m)
    assert not eval_file(tmp_path, 1, "dev").exists() and eval_file(tmp_path, 1).is_file()
