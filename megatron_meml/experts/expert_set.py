"""The expert set: K system prompts, prompt rendering, SFT targets and the MEF training data.

Prompt rendering. With a chat template (Qwen2.5, Llama 3, ...) and ``experts.chat_template: auto``:
``apply_chat_template([system: expert prompt + answer-format instruction, user: question],
add_generation_prompt=True)``, tokenized without extra special tokens. Without one (or ``chat_template: plain``):
``[BOS] + experts.plain_template.format(system=..., question=...)``, default ``"{system}\\n{question}\\n"``.

SFT targets are prompt ids + response ids + EOS, with the loss on the response (and EOS) only, aligned like
:class:`~megatron_meml.types.TrainBatch`: ``loss_mask[t] = 1`` when ``tokens[t + 1]`` is a response token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_meml.data.charset import synthetic_tokenizer
from megatron_meml.data.rows import BadRows, DataError, opt, parse_rows, read_rows, req_str
from megatron_meml.experts.config import ExpertsConfig
from megatron_meml.rewards.extract import format_answer
from megatron_meml.types import KINDS, Problem

log = logging.getLogger(__name__)

PACKAGE_PROMPTS = Path(__file__).resolve().parents[1] / "recipes" / "prompts"
"""The packaged prompt sets (megatron_meml/recipes/prompts/<set>; the repository's recipes/ links there)."""
PACKAGE_PROMPT_DIR = PACKAGE_PROMPTS / "experts"
"""The default set: the paper's experts and the synthetic family's."""
SYNTH_PREFIX = "synth_"
_WHAT = {"math": "the final answer", "choice": "the option letter", "bool": "yes or no"}
_INSTRUCTIONS = {
    "boxed": "Put {what} in \\boxed{{}}.",
    "the_answer_is": 'End with "The answer is X.", X being {what}.',
    "hash": "End with #### and {what}.",
}


def format_instruction(answer_format: str, kind: str) -> str:
    """The standard answer-format sentence, e.g. ``End with #### and the final answer.``"""
    return _INSTRUCTIONS[answer_format].format(what=_WHAT[kind])


@dataclass(frozen=True, kw_only=True)
class Expert:
    """One expert: an id and its system prompt."""

    index: int
    """Position in the active expert list (0 = the ground-truth-style expert)."""
    id: str
    """Expert id (the prompt file's stem)."""
    prompt: str
    """System prompt text, without the answer-format instruction."""
    style: Optional[str] = None
    """The gold-work style this expert learns (experts.styles, or the id synth_<style>); None: the dataset's own
    solution (the first expert) or teacher traces."""


def load_experts(cfg: ExpertsConfig, num_experts: int) -> tuple[Expert, ...]:
    """The first ``num_experts`` of ``cfg.ids`` with their prompt files read from ``cfg.prompt_dir``."""
    if num_experts > len(cfg.ids):
        raise ValueError(f"algo.num_experts={num_experts} but experts.ids names only {len(cfg.ids)}: {cfg.ids}")
    folder = Path(cfg.prompt_dir) if cfg.prompt_dir is not None else PACKAGE_PROMPTS / cfg.prompt_set
    if not folder.is_dir():
        sets = sorted(p.name for p in PACKAGE_PROMPTS.iterdir() if p.is_dir())
        raise ValueError(f"experts: prompt folder {folder} does not exist" + (
            "" if cfg.prompt_dir is not None else f" (experts.prompt_set: one of {sets})"))
    experts = []
    for i, eid in enumerate(cfg.ids[:num_experts]):
        path = folder / f"{eid}.txt"
        if not path.is_file():
            raise ValueError(f"experts.ids: no prompt file for expert '{eid}': {path} does not exist "
                             f"(files there: {sorted(p.name for p in folder.glob('*.txt'))})")
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"experts: prompt file {path} is empty")
        style = cfg.styles.get(eid) or (eid[len(SYNTH_PREFIX):] if eid.startswith(SYNTH_PREFIX) else None)
        experts.append(Expert(index=i, id=eid, prompt=text, style=style))
    return tuple(experts)


@dataclass(frozen=True, kw_only=True)
class SFTExample:
    """One supervised sequence (MEF, hard-example replay)."""

    tokens: list[int]
    """[T] prompt ids + response ids + EOS."""
    loss_mask: list[float]
    """[T] 1.0 at t when tokens[t + 1] is a response token (EOS included), else 0.0 (TrainBatch alignment)."""
    prompt_len: int
    """P: number of prompt tokens; the response occupies tokens[P:]."""
    expert: int
    """Expert index the prompt was rendered for."""
    problem_id: str
    """Problem.id."""


@dataclass(frozen=True, kw_only=True)
class JoinReport:
    """How one expert's teacher traces matched the problems."""

    expert_id: str
    file: Optional[str]
    """Trace file; None when the expert has none (then it adds no MEF rows unless it has a gold style)."""
    matched: int
    """Problems with at least one trace."""
    missing_ids: list[str] = field(default_factory=list)
    """Problems without a trace (dropped for this expert)."""
    extra_ids: list[str] = field(default_factory=list)
    """Trace ids naming no loaded problem (ignored)."""
    traces: int = 0
    """Trace rows joined (one MEF row each; more than ``matched`` when a file keeps several samples per id)."""

    def summary(self) -> str:
        if self.file is None:
            return f"expert {self.expert_id}: no teacher_traces file, no MEF rows"
        joined = (f"{self.matched} traces" if self.traces <= self.matched
                  else f"{self.traces} traces for {self.matched} problems")
        return (f"expert {self.expert_id}: {joined} joined from {self.file}; "
                f"{len(self.missing_ids)} problems without a trace (e.g. {self.missing_ids[:3]}), "
                f"{len(self.extra_ids)} traces for unknown ids (e.g. {self.extra_ids[:3]})")


def read_teacher_traces(path: str | Path, *, skip_bad_rows: bool = False) -> dict[str, list[str]]:
    """``{id: [response, ...]}`` (file order) from a JSONL file of ``{"id", "response", "sample"?}`` rows; errors
    name the line and field.

    One row per id, as files have always been; an id may repeat only when every row of it carries a distinct
    integer ``sample`` (``meml traces`` writes one, the draw index, with each row). A repeated id without
    ``sample`` fields is a duplicate, as before."""
    def parse(ref, row: dict) -> tuple[Any, str, str, Optional[int]]:
        rid = opt(ref, row, "id", (str, int), None)
        if rid is None:
            raise DataError(f"{ref.where()}: missing field 'id'")
        sample = opt(ref, row, "sample", (int,), None)
        if sample is not None and sample < 0:
            raise DataError(f"{ref.where()}: field 'sample' must be >= 0, got {sample}")
        return ref, str(rid), req_str(ref, row, "response"), sample

    bad = BadRows(skip=skip_bad_rows)
    out: dict[str, list[str]] = {}
    seen: dict[str, set[Optional[int]]] = {}
    for ref, rid, response, sample in parse_rows(read_rows(path), parse, bad):
        samples = seen.setdefault(rid, set())
        if samples and (sample is None or None in samples):
            bad.handle(DataError(f"{ref.where()}: field 'id': duplicate id '{rid}' (rows sharing an id need "
                                 "distinct integer 'sample' fields)"))
            continue
        if sample in samples:
            bad.handle(DataError(f"{ref.where()}: field 'sample': duplicate sample {sample} for id '{rid}'"))
            continue
        samples.add(sample)
        out.setdefault(rid, []).append(response)
    bad.summary(str(path))
    return out


def load_teacher_traces(path: str | Path, *, skip_bad_rows: bool = False) -> dict[str, str]:
    """``{id: response}`` from a one-trace-per-id file (:func:`read_teacher_traces` reads files with several)."""
    by_id = read_teacher_traces(path, skip_bad_rows=skip_bad_rows)
    multi = next((rid for rid, rs in by_id.items() if len(rs) > 1), None)
    if multi is not None:
        raise DataError(f"{path}: id '{multi}' has {len(by_id[multi])} traces (rows with 'sample' fields); "
                        "read the file with read_teacher_traces")
    return {rid: rs[0] for rid, rs in by_id.items()}


class ExpertSet:
    """K experts bound to one tokenizer: renders prompts, gold responses and SFT examples."""

    def __init__(self, experts: Sequence[Expert], tokenizer: Any, cfg: ExpertsConfig) -> None:
        self.experts = tuple(experts)
        self.tokenizer = tokenizer
        self.cfg = cfg
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = cfg.chat_template == "auto" and has_template
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("ExpertSet: the tokenizer has no eos_token_id (needed to end SFT targets)")

    @classmethod
    def from_config(cls, cfg: ExpertsConfig, num_experts: int, tokenizer: Any) -> "ExpertSet":
        return cls(load_experts(cfg, num_experts), tokenizer, cfg)

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.experts]

    # ------------------------------------------------------------------------------------------ prompts
    def system_text(self, expert: int, problem: Problem) -> str:
        """Expert prompt plus the answer-format instruction for this problem's kind."""
        instruction = self.cfg.format_instruction
        if instruction is None:
            instruction = format_instruction(self.cfg.answer_format, problem.kind)
        prompt = self.experts[expert].prompt
        return f"{prompt} {instruction}" if instruction else prompt

    def prompt_text(self, expert: int, problem: Problem) -> str:
        """The rendered prompt text (chat template or plain template; BOS not shown)."""
        system = self.system_text(expert, problem)
        if not self.use_chat_template:
            return self.cfg.plain_template.format(system=system, question=problem.question)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": problem.question}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates without a system role: fold it into the user turn
            merged = [{"role": "user", "content": f"{system}\n\n{problem.question}"}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, expert: int, problem: Problem) -> list[int]:
        """[P] prompt token ids for (expert, problem)."""
        ids = self._encode(self.prompt_text(expert, problem))
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if not self.use_chat_template and bos is not None:
            ids = [bos] + ids
        return ids

    def expand(self, problems: Sequence[Problem]) -> list[tuple[Problem, int, list[int]]]:
        """(problem, expert index, prompt ids) for every problem x expert, problem-major."""
        return [(p, e.index, self.prompt_ids(e.index, p)) for p in problems for e in self.experts]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------------------------------ targets
    def gold_response(self, expert: int, problem: Problem, *, own_style: bool = True) -> str:
        """Gold work in this expert's style (synthetic; with own_style) or the problem's solution, then the answer
        line."""
        style = self.experts[expert].style if own_style else None
        solutions = problem.meta.get("solutions") if isinstance(problem.meta, dict) else None
        body = solutions[style] if style and isinstance(solutions, dict) and style in solutions else problem.solution
        line = format_answer(problem.answer, self.cfg.answer_format)
        return f"{body.rstrip()}\n{line}" if body.strip() else line

    def sft_example(self, expert: int, problem: Problem, response: str) -> SFTExample:
        """Prompt + response + EOS with the loss on the response only."""
        prompt = self.prompt_ids(expert, problem)
        response_ids = self._encode(response) + [int(self.tokenizer.eos_token_id)]
        tokens = prompt + response_ids
        mask = [0.0] * (len(prompt) - 1) + [1.0] * len(response_ids) + [0.0]
        return SFTExample(tokens=tokens, loss_mask=mask, prompt_len=len(prompt), expert=expert,
                          problem_id=problem.id)

    def mef_examples(self, problems: Sequence[Problem],
                     traces: Optional[dict[str, dict[str, str | list[str]]]] = None
                     ) -> tuple[list[SFTExample], list[JoinReport]]:
        """Stage-1 MEF data: expert 0 and synth_<style> experts learn the gold work; every other expert learns
        its teacher traces (``traces[expert_id]``: id -> response or responses; default: read from
        ``experts.teacher_traces``), joined by id, one row per trace."""
        rows: list[SFTExample] = []
        reports: list[JoinReport] = []
        for e in self.experts:
            if e.index == 0 or e.style is not None:
                _check_style(e, problems)
                rows.extend(self.sft_example(e.index, p, self.gold_response(e.index, p)) for p in problems)
                continue
            file = self.cfg.teacher_traces.get(e.id)
            given = (traces or {}).get(e.id)
            if given is None and file is None:
                reports.append(JoinReport(expert_id=e.id, file=None, matched=0))
                log.warning(reports[-1].summary())
                continue
            by_id = ({k: [v] if isinstance(v, str) else list(v) for k, v in given.items()} if given is not None
                     else read_teacher_traces(file))
            report = _join_report(e.id, file or "<given>", problems, by_id)
            reports.append(report)
            log.info(report.summary())
            by_problem = {p.id: p for p in problems}
            rows.extend(self.sft_example(e.index, by_problem[pid], resp.rstrip())
                        for pid, resps in by_id.items() if pid in by_problem for resp in resps)
        return rows, reports


def _check_style(expert: Expert, problems: Sequence[Problem]) -> None:
    """DataError when an expert's style is not among the gold-work styles of a training problem."""
    if expert.style is None:
        return
    for p in problems:
        solutions = p.meta.get("solutions") if isinstance(p.meta, dict) else None
        if not isinstance(solutions, dict) or expert.style not in solutions:
            have = sorted(solutions) if isinstance(solutions, dict) else []
            raise DataError(f"experts.styles: expert '{expert.id}' writes style '{expert.style}', but problem "
                            f"'{p.id}' ({p.source}) has gold work in {have or 'no styles'}; choose one of those or "
                            "drop the expert from experts.styles")


def _join_report(expert_id: str, file: str, problems: Sequence[Problem],
                 traces: dict[str, list[str]]) -> JoinReport:
    ids = [p.id for p in problems]
    known = set(ids)
    missing = [pid for pid in ids if not traces.get(pid)]
    extra = [tid for tid in traces if tid not in known]
    return JoinReport(expert_id=expert_id, file=file, matched=len(ids) - len(missing), missing_ids=missing,
                      extra_ids=extra, traces=sum(len(traces[pid]) for pid in known if pid in traces))


def vocab_texts(experts: Sequence[Expert], cfg: ExpertsConfig, kinds: Sequence[str] = ("math",)) -> list[str]:
    """Every text the expert set adds around questions and gold work (prompts, instructions, template, answer
    line), for building a character tokenizer that covers them (``data.charset.synthetic_tokenizer``)."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"vocab_texts: unknown kind '{kind}'")
    texts = [e.prompt for e in experts] + [cfg.plain_template.format(system=" ", question="")]
    if cfg.format_instruction is None:
        texts += [format_instruction(cfg.answer_format, k) for k in kinds]
    else:
        texts.append(cfg.format_instruction)
    texts.append(format_answer("0", cfg.answer_format))
    return texts


def synthetic_expert_set(cfg: ExpertsConfig, num_experts: int) -> ExpertSet:
    """The expert set for the synthetic family with its character tokenizer built to cover exactly its texts."""
    experts = load_experts(cfg, num_experts)
    # the vocabulary covers every configured expert, not only the active ones: a 1-expert RL run from a K-expert MEF
    # model (DAPO-1exp) must read the same token ids the model was trained on
    return ExpertSet(experts, synthetic_tokenizer(vocab_texts(load_experts(cfg, len(cfg.ids)), cfg)), cfg)
