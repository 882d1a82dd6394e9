"""Expert-set configuration (the K system prompts); the expert logic is in expert_set.py.

The defaults fit the embedded default task (``data.source: synthetic``): three short synthetic-style experts
answering in ``#### X`` form. Benchmark recipes set ``ids: [expert0, expert1, expert2]`` (the paper's experts)
and usually ``answer_format: the_answer_is`` or ``boxed``.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_meml.types import ANSWER_FORMATS


@dataclass(frozen=True, kw_only=True)
class ExpertsConfig:
    """K experts: ids and where their system prompts come from."""

    ids: List[str] = field(default_factory=lambda: ["synth_direct", "synth_steps", "synth_columns"])
    """Expert ids; each has a prompt file <prompt_dir>/<id>.txt. The first is the ground-truth-style expert.
    An id synth_<style> writes the synthetic family's gold work in that style (direct, steps, columns)."""
    prompt_set: str = "experts"
    """A packaged set of prompt files: megatron_meml/recipes/prompts/<prompt_set>/<id>.txt (experts: the paper's
    long expert descriptions; short: one sentence each, for the CPU defaults whose experts learn their style in
    MEF). ``prompt_dir`` wins over it."""
    prompt_dir: Optional[str] = None
    """Directory of prompt files; None: the packaged ones (megatron_meml/recipes/prompts/experts)."""
    answer_format: str = "hash"
    """Answer format the prompts ask for and the verifier extracts: boxed, the_answer_is, hash."""
    format_instruction: Optional[str] = None
    """Sentence appended to every system prompt; None: the standard one for answer_format and the problem kind;
    an empty string: none."""
    teacher_traces: Dict[str, str] = field(default_factory=dict)
    """MEF: expert id -> JSONL file of {id, response} teacher traces (others use the gold solution)."""
    styles: Dict[str, str] = field(default_factory=dict)
    """MEF from rendered gold work: expert id -> a style the task family writes its gold solutions in (wordmath:
    plain, r1, plan). Such an expert learns every training problem's solution in its style, the CPU stand-in for a
    teacher that is always right and writes its own way; the others learn the dataset's solution (the first expert)
    or their teacher traces. Ids synth_<style> have their style already."""
    chat_template: str = "auto"
    """auto (the tokenizer's own, else the plain template) or plain."""
    plain_template: str = "{system}\n{question}\n"
    """Prompt text for tokenizers without a chat template (after BOS when the tokenizer has one); must use
    exactly the fields {system} and {question}."""

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("experts.ids must name at least one expert")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"experts.ids has duplicates: {self.ids}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"experts.answer_format must be one of {ANSWER_FORMATS}, got '{self.answer_format}'")
        if not self.prompt_set or "/" in self.prompt_set or self.prompt_set.startswith("."):
            raise ValueError(f"experts.prompt_set must name a packaged prompt folder, got '{self.prompt_set}'")
        if self.chat_template not in ("auto", "plain"):
            raise ValueError(f"experts.chat_template must be auto or plain, got '{self.chat_template}'")
        unknown = set(self.teacher_traces) - set(self.ids)
        if unknown:
            raise ValueError(f"experts.teacher_traces names experts not in experts.ids: {sorted(unknown)}")
        unknown = set(self.styles) - set(self.ids)
        if unknown:
            raise ValueError(f"experts.styles names experts not in experts.ids: {sorted(unknown)}")
        both = sorted(set(self.styles) & set(self.teacher_traces))
        if both:
            raise ValueError(f"experts {both} have both experts.styles and experts.teacher_traces; MEF learns one: "
                             "drop one of the two")
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.plain_template) if f is not None]
        except ValueError as e:
            raise ValueError(f"experts.plain_template is not a valid format string: {e}") from None
        if sorted(names) != ["question", "system"]:
            raise ValueError(f"experts.plain_template must use {{system}} and {{question}} once each, got {names}")
