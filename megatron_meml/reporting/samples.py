"""Seeing what the model writes: a few completions per RIEL step and per evaluation, and the per-problem eval file.

* ``<run_dir>/samples.jsonl``: one :class:`Sample` per line (``logging.samples_per_step`` per RIEL step and per
  evaluation, picked by a seed of the stage and step and spread over the experts; the writer rank's data only).
  The same rows go to TensorBoard text (tag ``samples``, run ``tb/<stage>``) as a markdown table, and
  ``meml report`` shows the latest ones in summary.md.
* ``<run_dir>/eval/step_<N>.jsonl``: one :class:`EvalProblem` per held-out problem of the evaluation at step N
  (every expert's greedy reward, extracted answer and format flag), from which the report counts how the experts
  complement each other; ``eval/step_<N>.dev.jsonl`` the same for the dev problems (``data.dev_size``).
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.distributed as dist

from megatron_meml.atomic_file import atomic_write
from megatron_meml.reporting.metrics import SAMPLES_FILE, read_jsonl
from megatron_meml.rewards import Score, answer_in_format, score
from megatron_meml.seeding import stable_seed
from megatron_meml.types import Completion, ExpertGroup, Problem

EVAL_DIR = "eval"
TABLE_CHARS = {"prompt": 120, "prompt_tail": 160, "completion": 300, "extracted": 40, "gold": 40}
"""Characters kept per cell of a rendered samples table (longer text keeps its head and tail around an ellipsis)."""


@dataclass(frozen=True, kw_only=True)
class GreedyResult:
    """One expert's greedy answer to one problem and its read-outs."""

    completion: Completion
    score: Score
    """The format-bound verifier's verdict (what accuracy counts)."""
    in_format: bool
    """An answer in the required format (experts.answer_format) was found."""
    last_number: Optional[Score] = None
    """The last number in the completion against the gold answer (math problems; else None)."""


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One completion as the model wrote it, with its verdict."""

    stage: str
    """train (a RIEL rollout) or eval (a greedy evaluation answer)."""
    step: int
    expert: str
    """Expert id."""
    problem_id: str
    prompt: str
    """The question text."""
    completion: str
    reward: float
    extracted: Optional[str]
    """The answer the verifier found (None: none)."""
    gold: str
    finish_reason: str
    """stop | length."""
    in_format: bool
    """The answer was written in the required format (experts.answer_format)."""
    sample_index: int = 0
    """Which of the expert's G rollouts of this problem (0 for a greedy eval answer)."""
    prompt_tail: str = ""
    """The last ``logging.sample_prompt_chars`` characters of the rendered prompt ("" when 0)."""


@dataclass(frozen=True, kw_only=True)
class EvalProblem:
    """Every expert's greedy result on one held-out problem."""

    step: int
    bench: str
    index: int
    """Position in the evaluated problem list."""
    problem_id: str
    gold: str
    rewards: dict[str, float]
    """Expert id -> greedy reward."""
    extracted: dict[str, Optional[str]]
    """Expert id -> extracted answer (None: none found)."""
    in_format: dict[str, bool]
    """Expert id -> answer in the required format."""
    last_number_rewards: dict[str, float] = field(default_factory=dict)
    """Expert id -> reward of the completion's last number (math problems; else empty)."""


# ------------------------------------------------------------------------------------------------ picking
def pick_samples(experts: Sequence[int], n: int, seed: int) -> list[int]:
    """Indices of ``min(n, len(experts))`` candidates, ``experts[c]`` being candidate c's expert: a seeded shuffle
    within each expert, then round robin over the experts from a seeded start, so that every expert present gets
    ``n // K`` or one more (while it has candidates). Deterministic in (experts, n, seed)."""
    rng = random.Random(seed)
    pools: dict[int, list[int]] = {}
    for c, e in enumerate(experts):
        pools.setdefault(e, []).append(c)
    order = sorted(pools)
    for e in order:
        rng.shuffle(pools[e])
    if order:
        start = rng.randrange(len(order))
        order = order[start:] + order[:start]
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n, len(experts)):
        picked += [pools[e][depth] for e in order if depth < len(pools[e])][: n - len(picked)]
        depth += 1
    return picked


def _seed(ctx: Any, stage: str, step: int) -> int:
    return stable_seed(ctx.cfg.seed, "samples", stage, step)


def _prompt_tail(ctx: Any, expert: int, problem: Problem) -> str:
    n = ctx.cfg.logging.sample_prompt_chars
    return ctx.experts.prompt_text(expert, problem)[-n:] if n else ""


def make_sample(ctx: Any, stage: str, step: int, problem: Problem, expert: int, completion: Completion, *,
                reward: float, sample_index: int = 0, verdict: Any = None) -> Sample:
    """A :class:`Sample` of ``completion`` (``verdict``: its rewards.Score; None: scored here)."""
    cfg = ctx.cfg
    fmt = cfg.experts.answer_format
    verdict = verdict if verdict is not None else score(problem, completion.text, fmt, cfg.reward)
    return Sample(stage=stage, step=int(step), expert=ctx.experts.ids[expert], problem_id=problem.id,
                  prompt=problem.question, completion=completion.text, reward=float(reward),
                  extracted=verdict.extracted, gold=problem.answer, finish_reason=completion.finish_reason,
                  in_format=answer_in_format(completion.text, fmt, cfg.reward.tail_chars),
                  sample_index=sample_index, prompt_tail=_prompt_tail(ctx, expert, problem))


def _publish(ctx: Any, step: int, stage: str, rows: list[Sample]) -> None:
    ctx.logger.log_samples(rows)
    ctx.logger.log_text(step, "samples", samples_markdown(rows), stage=stage)


# ------------------------------------------------------------------------------------------------ RIEL hook
def format_rates(groups: Sequence[ExpertGroup], expert_ids: Sequence[str], answer_format: str,
                 tail_chars: int) -> dict[str, float]:
    """``expert/<id>/format_rate``: the fraction of that expert's sampled completions with an answer in the
    required format."""
    hits: dict[int, list[bool]] = {}
    for grp in groups:
        hits.setdefault(grp.expert, []).extend(answer_in_format(c.text, answer_format, tail_chars)
                                               for c in grp.completions)
    return {f"expert/{expert_ids[e]}/format_rate": sum(h) / len(h) for e, h in sorted(hits.items()) if h}


def riel_samples(ctx: Any, step: int, groups: Sequence[ExpertGroup]) -> dict[str, float]:
    """The RIEL step's read-outs: returns ``expert/<id>/format_rate``; on the writer rank, also logs
    ``logging.samples_per_step`` of the step's completions (seeded by the step, spread over experts)."""
    cfg = ctx.cfg
    metrics = format_rates(groups, ctx.experts.ids, cfg.experts.answer_format, cfg.reward.tail_chars)
    n = cfg.logging.samples_per_step
    if not (n and ctx.is_writer):
        return metrics
    cands = [(g, c) for g, grp in enumerate(groups) for c in range(len(grp.completions))]
    picked = pick_samples([groups[g].expert for g, _ in cands], n, _seed(ctx, "train", step))
    rows = [make_sample(ctx, "train", step, groups[g].problem, groups[g].expert, groups[g].completions[c],
                        reward=groups[g].rewards[c], sample_index=c) for g, c in (cands[i] for i in picked)]
    _publish(ctx, step, "train", rows)
    return metrics


# ------------------------------------------------------------------------------------------------ eval hook
def eval_problem_rows(step: int, bench: str, shard: Sequence[Problem], indices: Sequence[int],
                      expert_ids: Sequence[str], results: Sequence[Sequence[GreedyResult]]) -> list[EvalProblem]:
    """One :class:`EvalProblem` per problem of ``shard`` (``results[e][i]``: expert e on shard[i])."""
    rows = []
    for i, (p, index) in enumerate(zip(shard, indices)):
        mine = {eid: results[e][i] for e, eid in enumerate(expert_ids)}
        rows.append(EvalProblem(
            step=int(step), bench=bench, index=int(index), problem_id=p.id, gold=p.answer,
            rewards={k: r.score.reward for k, r in mine.items()},
            extracted={k: r.score.extracted for k, r in mine.items()},
            in_format={k: r.in_format for k, r in mine.items()},
            last_number_rewards={k: r.last_number.reward for k, r in mine.items() if r.last_number is not None}))
    return rows


def _gather(rows: list[EvalProblem]) -> list[EvalProblem]:
    """Every rank's rows (collective when distributed), one per problem, in problem order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, rows)
        rows = [r for part in every for r in part]
    return sorted({r.index: r for r in rows}.values(), key=lambda r: r.index)


def eval_file(run_dir: Path | str, step: int, split: str = "test") -> Path:
    """The per-problem file of the evaluation at ``step``: ``eval/step_<N>.jsonl`` for the test problems,
    ``eval/step_<N>.<split>.jsonl`` for another split (``dev``)."""
    tag = "" if split == "test" else f".{split}"
    return Path(run_dir) / EVAL_DIR / f"step_{int(step)}{tag}.jsonl"


def write_eval_problems(path: Path, rows: Sequence[EvalProblem]) -> Path:
    """Write ``rows`` to ``path`` atomically (an evaluation at the same step again replaces the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n"
                               for r in rows).encode("utf-8"))
    return path


def record_eval(ctx: Any, step: int, bench: str, shard: Sequence[Problem],
                results: Sequence[Sequence[GreedyResult]], split: str = "test") -> None:
    """Collective: the per-problem file of this evaluation on ``split`` and (writer rank, test problems) its
    samples."""
    indices = range(ctx.dp_rank, ctx.dp_rank + ctx.dp_size * len(shard), ctx.dp_size)
    rows = _gather(eval_problem_rows(step, bench, shard, indices, ctx.experts.ids, results))
    if not ctx.is_writer:
        return
    write_eval_problems(eval_file(ctx.run_dir, step, split), rows)
    n = ctx.cfg.logging.samples_per_step if split == "test" else 0
    if n:
        cands = [(e, i) for e in range(len(results)) for i in range(len(shard))]
        picked = pick_samples([e for e, _ in cands], n, _seed(ctx, "eval", step))
        samples = [make_sample(ctx, "eval", step, shard[i], e, results[e][i].completion,
                               reward=results[e][i].score.reward, verdict=results[e][i].score)
                   for e, i in (cands[c] for c in picked)]
        _publish(ctx, step, "eval", samples)


# ------------------------------------------------------------------------------------------------ reading
def read_samples(run_dir: Path | str) -> list[Sample]:
    """Every :class:`Sample` of ``<run_dir>/samples.jsonl`` in file order ([] when the file does not exist)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    return [_from_record(Sample, rec, path, i) for i, rec in enumerate(read_jsonl(path), start=1)]


def latest_eval_file(run_dir: Path | str) -> Optional[Path]:
    """The per-problem file of the latest evaluation step (None: no evaluation wrote one)."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / EVAL_DIR).glob("step_*.jsonl")
             if (m := re.fullmatch(r"step_(\d+)\.jsonl", p.name))]
    return max(found)[1] if found else None


def read_eval_problems(path: Path) -> list[EvalProblem]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {i} is not JSON ({e}); fix or remove that line") from None
        out.append(_from_record(EvalProblem, rec, path, i))
    return out


def _from_record(cls: type, rec: dict, path: Path, line: int) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in rec.items() if k in names})
    except TypeError as e:
        raise ValueError(f"{path}: line {line} is not a {cls.__name__} row ({e})") from None


# ------------------------------------------------------------------------------------------------ markdown
def clip(text: str, max_chars: int) -> str:
    """``text`` itself when it fits, else its first third and last two thirds around " … " (``max_chars`` in
    all): a completion's answer comes last."""
    if len(text) <= max_chars:
        return text
    keep = max(max_chars - 3, 2)
    head = keep // 3
    return f"{text[:head]} … {text[len(text) - (keep - head):]}"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]$~|])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def md_cell(text: Optional[str], max_chars: int) -> str:
    """``text`` clipped to ``max_chars`` and shown as written inside a markdown table cell: ``|`` and the other
    markdown/LaTeX markers (backslash, backtick, ``*``, ``_``, brackets, ``$``, ``~``) backslash-escaped, HTML special
    characters as entities, line breaks as ``<br>``, tabs as spaces, other control characters as ``\\xNN``; None
    shows as ``-``."""
    if text is None:
        return "-"
    s = clip(str(text), max_chars)
    s = _MD_SPECIAL.sub(r"\\\1", s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
    s = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s.replace("\t", " "))
    return re.sub(r"\r\n|\r|\n", "<br>", s)


def samples_markdown(rows: Sequence[Sample]) -> str:
    """A markdown table of ``rows`` (with a prompt-tail column when any row has one)."""
    tail = any(r.prompt_tail for r in rows)
    head = ["step", "expert", "problem", "question", *(["prompt tail"] if tail else []), "completion", "reward",
            "extracted", "gold", "finish", "in format"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [str(r.step), md_cell(r.expert, 40), md_cell(r.problem_id, 40),
                 md_cell(r.prompt, TABLE_CHARS["prompt"]),
                 *([md_cell(r.prompt_tail, TABLE_CHARS["prompt_tail"])] if tail else []),
                 md_cell(r.completion, TABLE_CHARS["completion"]), f"{r.reward:g}",
                 md_cell(r.extracted, TABLE_CHARS["extracted"]), md_cell(r.gold, TABLE_CHARS["gold"]),
                 md_cell(r.finish_reason, 12), "yes" if r.in_format else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
