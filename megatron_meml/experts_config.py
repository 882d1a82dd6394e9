"""Expert-set configuration (the K system prompts); the expert logic is in experts.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

ANSWER_FORMATS = ("boxed", "the_answer_is", "hash")


@dataclass(frozen=True, kw_only=True)
class ExpertsConfig:
    """K experts: ids and where their system prompts come from."""

    ids: List[str] = field(default_factory=lambda: ["expert0", "expert1", "expert2"])
    """Expert ids; each has a prompt file <prompt_dir>/<id>.txt. The first is the ground-truth-style expert."""
    prompt_dir: Optional[str] = None
    """Directory of prompt files; None: the packaged recipes/prompts/experts."""
    answer_format: str = "the_answer_is"
    """Answer format the prompts ask for and the verifier extracts: boxed, the_answer_is, hash."""
    teacher_traces: Dict[str, str] = field(default_factory=dict)
    """MEF: expert id -> JSONL file of {id, response} teacher traces (others use the gold solution)."""
    chat_template: str = "auto"
    """auto (the tokenizer's own, else the plain template) or plain."""

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("experts.ids must name at least one expert")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"experts.ids has duplicates: {self.ids}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"experts.answer_format must be one of {ANSWER_FORMATS}, got '{self.answer_format}'")
        if self.chat_template not in ("auto", "plain"):
            raise ValueError(f"experts.chat_template must be auto or plain, got '{self.chat_template}'")
