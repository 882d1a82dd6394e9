"""The stages' own configs: evaluation, teacher traces (``meml traces``) and checkpoints. Leaf module: it imports
nothing from the package, so ``config.py`` can assemble it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True, kw_only=True)
class TracesConfig:
    """Which teacher answers which expert prompts, how often, what is kept, and where it goes."""

    teacher_path: Optional[str] = None
    """Hugging Face model directory (config.json, safetensors, tokenizer) of the teacher, run on vLLM at
    rollout.tensor_parallel_size; None: the policy itself, model.hf_path."""
    experts: Optional[List[str]] = None
    """Expert ids to generate traces for; None: every active expert (the first algo.num_experts of experts.ids)
    except the ground-truth-style ones (the first expert and synth_*), which learn the gold solutions."""
    samples_per_expert: int = 8
    """N: responses sampled per (problem, expert)."""
    keep_per_problem: int = 1
    """M: at most this many distinct correct responses kept per (problem, expert), the first ones drawn."""
    temperature: float = 1.0
    """Sampling temperature of the teacher (0: greedy, with samples_per_expert=1)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of the teacher."""
    max_new_tokens: int = 0
    """Longest response in tokens; 0: rollout.max_new_tokens."""
    require_stop: bool = True
    """Keep only responses the teacher ended itself (EOS), not ones cut at max_new_tokens."""
    max_problems: int = 0
    """Use the first N training problems (after data.max_problems); 0: all."""
    out_dir: Optional[str] = None
    """Directory of the trace files and the progress/summary files; None: <output_dir>/<run_name>/traces."""
    chunk_size: int = 64
    """Problems per chunk: each chunk's files are appended and fsynced, then progress.json records it."""
    max_chunks: int = 0
    """Stop after this many chunks in this invocation (0: run to the end); the next run continues."""
    save_samples: bool = False
    """Also write every drawn sample with its verdict to <out_dir>/samples/<expert>.jsonl."""

    def __post_init__(self) -> None:
        for name in ("samples_per_expert", "keep_per_problem", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"traces.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_new_tokens", "max_problems", "max_chunks"):
            if getattr(self, name) < 0:
                raise ValueError(f"traces.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_per_problem > self.samples_per_expert:
            raise ValueError(f"traces.keep_per_problem ({self.keep_per_problem}) must be <= "
                             f"traces.samples_per_expert ({self.samples_per_expert})")
        if self.temperature < 0:
            raise ValueError(f"traces.temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.samples_per_expert > 1:
            raise ValueError(f"traces.temperature=0 (greedy) draws one answer: set traces.samples_per_expert=1, "
                             f"got {self.samples_per_expert}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"traces.top_p must be in (0, 1], got {self.top_p}")
        if self.experts is not None and (not self.experts or len(set(self.experts)) != len(self.experts)):
            raise ValueError(f"traces.experts must be null or a non-empty list without duplicates, got {self.experts}")
        for name in ("teacher_path", "out_dir"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise ValueError(f"traces.{name} must be null or a path, got an empty string")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What evaluation measures."""

    max_problems: int = 200
    """Held-out problems evaluated (the first N of the held-out split; 0: all)."""
    pass_k: int = 4
    """Samples per problem for pass@k (temperature 1); 0 disables pass@k."""
    every: int = 0
    """Evaluate every N RIEL steps as well as at the end (0: only at the end)."""
    max_new_tokens: int = 0
    """Generation budget; 0: rollout.max_new_tokens."""
    coverage_samples: int = 0
    """G > 0: ``meml eval`` also measures coverage, the fraction of the evaluated problems with a correct sample,
    for K experts x G samples against each expert alone with K x G (stages/coverage.py); one process only."""
    at_start: bool = False
    """Also evaluate the starting weights, as step 0, before the first step of a fresh (not resumed) run: the base
    model of a MEF run, the MEF model of a RIEL run. The engine then stays up through training (asleep, where the
    platform has sleep mode) and gets the trained weights by one weight sync."""

    def __post_init__(self) -> None:
        for name in ("max_problems", "pass_k", "every", "max_new_tokens", "coverage_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When and where checkpoints are written, and what to resume from."""

    save_every: int = 50
    """Save a resumable checkpoint every N steps and at the end of RIEL (0: only on SIGTERM/SIGUSR1). The trained
    model (final_model/) is written at the end either way."""
    keep_last: int = 2
    """How many step checkpoints to keep."""
    resume: str = "auto"
    """auto (latest in the run directory, if any), none, or a checkpoint directory."""
    load_optimizer: bool = True
    """Restore optimizer state when resuming."""

    def __post_init__(self) -> None:
        if self.save_every < 0:
            raise ValueError(f"checkpoint.save_every must be >= 0, got {self.save_every}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
