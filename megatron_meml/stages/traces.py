"""``meml traces``: teacher traces for MEF, the files ``experts.teacher_traces`` names.

problems -> the chosen experts' prompts (``ExpertSet.prompt_ids``, rendered with the teacher's tokenizer) -> the
teacher on the vLLM rollout backend (N samples each) -> the verifier (``rewards.score``) -> the first M distinct
correct responses per (problem, expert) -> ``<out_dir>/<expert>.jsonl`` rows ``{"id", "response", "sample"}``.

The teacher is any Hugging Face directory vLLM runs (``traces.teacher_path``, at ``rollout.tensor_parallel_size``),
by default the policy itself (``model.hf_path``). The work goes in chunks of ``traces.chunk_size`` problems; each
chunk is drawn with a seed of (run seed, chunk index, expert), committed with an fsync and a progress file
(``traces_store.py``), so an interrupted run continues where it stopped and ends with the same files as an
uninterrupted one. At the end the yield per expert goes to stdout and ``summary.json``, and ``traces.yaml`` holds
the ``experts.teacher_traces`` recipe fragment for ``meml sft``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_meml.config import MemlConfig
from megatron_meml.experts.expert_set import Expert, ExpertSet
from megatron_meml.rewards.config import RewardConfig
from megatron_meml.rewards.score import score
from megatron_meml.rollout.backend import SamplingSpec
from megatron_meml.rollout.vllm_backend import RolloutEngineError, VLLMBackend
from megatron_meml.seeding import stable_seed
from megatron_meml.stages.config import TracesConfig
from megatron_meml.stages.context import load_data, setup_threads
from megatron_meml.stages.traces_store import (FRAGMENT, SUMMARY, ExpertTally, TracesError, TraceStore,
                                               write_atomic)
from megatron_meml.types import Completion, Problem

__all__ = ["TracesConfig", "TracesError", "run_traces", "select_traces", "traces_fragment"]


@dataclass(frozen=True, kw_only=True)
class TracesPlan:
    """Everything ``meml traces`` resolved before it draws anything."""

    teacher: Path
    """Teacher model directory."""
    out_dir: Path
    """Output directory."""
    experts: ExpertSet
    """The active experts, bound to the teacher's tokenizer."""
    chosen: tuple[Expert, ...]
    """Experts that get traces."""
    problems: list[Problem]
    """Training problems, in order."""
    budget: int
    """Maximum new tokens per response."""
    prompt_limit: int
    """Longest prompt sampled, in tokens."""
    max_model_len: int
    """vLLM context length: prompt_limit + budget."""
    chunk_size: int
    """Problems per chunk (traces.chunk_size)."""

    @property
    def num_chunks(self) -> int:
        return (len(self.problems) + self.chunk_size - 1) // self.chunk_size


# ----------------------------------------------------------------------------------------------- selection
def select_traces(problem: Problem, completions: Sequence[Completion], cfg: TracesConfig, answer_format: str,
                  reward: RewardConfig) -> tuple[list[dict], list[dict], ExpertTally]:
    """Score one (problem, expert)'s samples and keep the first ``cfg.keep_per_problem`` distinct correct ones.

    Returns (trace rows ``{"id", "response", "sample"}``, one sample row per completion with its verdict, the
    counts). ``sample`` is the draw index; two responses are the same when equal after ``rstrip`` (what MEF
    trains on); with ``cfg.require_stop`` a response cut at max_new_tokens is never kept."""
    tally = ExpertTally(problems=1, samples_drawn=len(completions))
    kept: list[dict] = []
    samples: list[dict] = []
    texts: set[str] = set()
    for k, c in enumerate(completions):
        verdict = score(problem, c.text, answer_format, reward)
        tally.statuses[verdict.status] = tally.statuses.get(verdict.status, 0) + 1
        keep = False
        if verdict.reward > 0:
            tally.correct += 1
            if cfg.require_stop and c.finish_reason != "stop":
                tally.dropped_truncated += 1
            elif c.text.rstrip() in texts:
                tally.dropped_duplicate += 1
            elif len(kept) < cfg.keep_per_problem:
                keep = True
                texts.add(c.text.rstrip())
                kept.append({"id": problem.id, "response": c.text, "sample": k})
        samples.append({"id": problem.id, "sample": k, "response": c.text, "status": verdict.status,
                        "extracted": verdict.extracted, "finish_reason": c.finish_reason, "kept": keep})
    tally.traces_kept = len(kept)
    tally.problems_with_trace = 1 if kept else 0
    return kept, samples, tally


# ----------------------------------------------------------------------------------------------- resolution
def teacher_dir(cfg: MemlConfig) -> Path:
    """traces.teacher_path, else the policy's HF directory; errors say what to set or export."""
    if cfg.traces.teacher_path is not None:
        path, key = Path(cfg.traces.teacher_path), "traces.teacher_path"
    elif cfg.model.megatron_path is not None:
        raise TracesError(f"the policy is the Megatron checkpoint model.megatron_path={cfg.model.megatron_path}, "
                          "which vLLM cannot load: export it (`meml export RUN_DIR --out DIR`) and set "
                          "traces.teacher_path=DIR, or set traces.teacher_path to another Hugging Face model")
    elif cfg.model.hf_path is not None:
        path, key = Path(cfg.model.hf_path), "model.hf_path"
    else:
        raise TracesError("no teacher model: set traces.teacher_path to a Hugging Face model directory (the "
                          "default teacher is the policy, model.hf_path, which is unset); a policy trained here "
                          "is exported with `meml export RUN_DIR --out DIR`")
    if not (path / "config.json").is_file():
        raise TracesError(f"{key}={path}: no config.json there; point it at a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        raise TracesError(f"{key}={path}: no *.safetensors weights there (a config-only directory gives a random "
                          "model); set traces.teacher_path to a model with weights, e.g. one from `meml export`")
    return path


def chosen_experts(cfg: MemlConfig, experts: ExpertSet) -> tuple[Expert, ...]:
    """The experts that get traces: traces.experts, or every expert that does not learn the gold work."""
    gold = {e.id for e in experts.experts if e.index == 0 or e.style is not None}
    if cfg.traces.experts is None:
        chosen = tuple(e for e in experts.experts if e.id not in gold)
        if not chosen:
            raise TracesError(f"traces.experts: every active expert ({experts.ids}) learns the gold solutions in "
                              "MEF (the first expert and synth_*); nothing needs teacher traces")
        return chosen
    by_id = {e.id: e for e in experts.experts}
    for eid in cfg.traces.experts:
        if eid not in by_id:
            raise TracesError(f"traces.experts: '{eid}' is not an active expert (the first algo.num_experts="
                              f"{len(experts)} of experts.ids: {experts.ids})")
        if eid in gold:
            raise TracesError(f"traces.experts: '{eid}' learns the gold solutions in MEF (the first expert and "
                              "synth_* do), so `meml sft` would ignore its traces; leave it out")
    return tuple(by_id[eid] for eid in cfg.traces.experts)


def _teacher_positions(teacher: Path) -> Optional[int]:
    hf = json.loads((teacher / "config.json").read_text())
    value = hf.get("max_position_embeddings", (hf.get("text_config") or {}).get("max_position_embeddings"))
    return int(value) if isinstance(value, int) and value > 0 else None


def plan_traces(cfg: MemlConfig) -> TracesPlan:
    """Resolve the teacher, its tokenizer and experts, the problems and the length limits (no engine yet)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TracesError("meml traces runs in one process (rollout.tensor_parallel_size sets the teacher's GPUs); "
                          "start it without torchrun/srun")
    teacher = teacher_dir(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(str(teacher))
    except Exception as e:  # noqa: BLE001 - any loader failure is the same user error
        raise TracesError(f"could not load the teacher's tokenizer from {teacher}: {type(e).__name__}: {e}") from e
    try:
        experts = ExpertSet.from_config(cfg.experts, cfg.algo.num_experts, tok)
    except ValueError as e:
        raise TracesError(str(e)) from None
    chosen = chosen_experts(cfg, experts)
    budget = cfg.traces.max_new_tokens or cfg.rollout.max_new_tokens
    positions = _teacher_positions(teacher)
    prompt_limit = cfg.rollout.max_prompt_tokens
    if positions is not None:
        if positions <= budget:
            raise TracesError(f"the teacher's context ({positions} tokens, {teacher}/config.json) has no room "
                              f"for prompts with max_new_tokens={budget}; lower traces.max_new_tokens")
        prompt_limit = min(prompt_limit, positions - budget)
    problems = load_data(cfg).train[: cfg.traces.max_problems or None]
    out_dir = Path(cfg.traces.out_dir) if cfg.traces.out_dir else Path(cfg.output_dir) / cfg.run_name / "traces"
    return TracesPlan(teacher=teacher, out_dir=out_dir, experts=experts, chosen=chosen,
                      problems=problems, budget=budget, prompt_limit=prompt_limit,
                      max_model_len=prompt_limit + budget, chunk_size=cfg.traces.chunk_size)


def fingerprint(cfg: MemlConfig, plan: TracesPlan) -> dict[str, Any]:
    """The settings that decide the output; a resumed run must match them exactly."""
    t = cfg.traces
    data = hashlib.sha256()
    for p in plan.problems:
        data.update(json.dumps([p.id, p.question, p.answer, p.kind, p.options]).encode())
    prompts = {e.id: e.prompt for e in plan.chosen}
    experts_cfg = {k: v for k, v in dataclasses.asdict(cfg.experts).items() if k != "teacher_traces"}
    return {"teacher": str(plan.teacher.resolve()), "seed": cfg.seed, "experts": [e.id for e in plan.chosen],
            "prompts": hashlib.sha256(json.dumps([prompts, experts_cfg], sort_keys=True).encode()).hexdigest(),
            "problems": f"{len(plan.problems)}:{data.hexdigest()}", "samples_per_expert": t.samples_per_expert,
            "keep_per_problem": t.keep_per_problem, "temperature": t.temperature, "top_p": t.top_p,
            "max_new_tokens": plan.budget, "prompt_limit": plan.prompt_limit, "require_stop": t.require_stop,
            "chunk_size": t.chunk_size, "save_samples": t.save_samples, "dtype": cfg.model.dtype,
            "reward": dataclasses.asdict(cfg.reward)}


# ----------------------------------------------------------------------------------------------- drawing
def draw_chunk(engine: Any, cfg: MemlConfig, plan: TracesPlan, chunk: int
               ) -> tuple[dict[str, list[dict]], dict[str, list[dict]], dict[str, ExpertTally]]:
    """Sample, score and select one chunk for every chosen expert: (trace rows, sample rows, counts) by expert."""
    t = cfg.traces
    problems = plan.problems[chunk * t.chunk_size:(chunk + 1) * t.chunk_size]
    rows: dict[str, list[dict]] = {}
    samples: dict[str, list[dict]] = {}
    tallies: dict[str, ExpertTally] = {}
    # A chunk starts from an empty prefix cache, as it does when a resumed run draws it first: the files stay
    # byte-identical to an uninterrupted run's (within the chunk the samples still share their prompts' blocks).
    engine.reset_prefix_cache()
    for e in plan.chosen:
        prompts = [(p, plan.experts.prompt_ids(e.index, p)) for p in problems]
        fits = [(p, ids) for p, ids in prompts if len(ids) <= plan.prompt_limit]
        spec = SamplingSpec(n=t.samples_per_expert, temperature=t.temperature, top_p=t.top_p,
                            max_tokens=plan.budget, seed=stable_seed(cfg.seed, "traces", chunk, e.id))
        outs = engine.generate([ids for _, ids in fits], spec) if fits else []
        tally = ExpertTally(skipped_long_prompts=len(prompts) - len(fits))
        rows[e.id], samples[e.id] = [], []
        n = t.samples_per_expert
        for i, (p, _) in enumerate(fits):
            kept, drawn, counts = select_traces(p, outs[i * n:(i + 1) * n], t, cfg.experts.answer_format,
                                                cfg.reward)
            rows[e.id] += kept
            samples[e.id] += drawn
            tally.add(counts)
        tallies[e.id] = tally
    return rows, samples, tallies


def _start_teacher(cfg: MemlConfig, plan: TracesPlan) -> Any:
    try:
        return VLLMBackend(plan.teacher, cfg.rollout, dtype=cfg.model.dtype, max_model_len=plan.max_model_len,
                           seed=cfg.seed)
    except RolloutEngineError as e:
        raise TracesError(f"the teacher {plan.teacher} did not start: {e}") from None


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM before preemption): finish the current chunk, commit it, stop."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _draw_all(cfg: MemlConfig, plan: TracesPlan, store: TraceStore, fp: dict[str, Any]) -> None:
    """Draw the remaining chunks (at most traces.max_chunks of them), committing each, with a progress bar."""
    size = cfg.traces.chunk_size
    setup_threads(cfg)
    engine = _start_teacher(cfg, plan)
    bar = tqdm(total=len(plan.problems), initial=min(store.chunks_done * size, len(plan.problems)), desc="traces",
               unit="problem", dynamic_ncols=True, disable=cfg.logging.progress == "off")
    drawn, limit = 0, cfg.traces.max_chunks or store.num_chunks
    try:
        with _StopFlag() as stop:
            while not store.complete and drawn < limit and not stop.requested:
                chunk = store.chunks_done
                rows, samples, tallies = draw_chunk(engine, cfg, plan, chunk)
                store.append_chunk(rows, samples, tallies, fp)
                drawn += 1
                bar.update(len(plan.problems[chunk * size:(chunk + 1) * size]))
                bar.set_postfix({e: f"{t.yield_:.2f}" for e, t in store.tallies.items()}, refresh=False)
    finally:
        bar.close()
        engine.shutdown()


# ----------------------------------------------------------------------------------------------- reporting
def traces_fragment(store: TraceStore) -> dict[str, Any]:
    """The recipe fragment that points ``meml sft`` at the trace files."""
    return {"experts": {"teacher_traces": {e: str(store.trace_file(e).resolve()) for e in store.expert_ids}}}


def _summary(cfg: MemlConfig, plan: TracesPlan, store: TraceStore) -> dict[str, Any]:
    return {"complete": store.complete, "chunks_done": store.chunks_done, "num_chunks": store.num_chunks,
            "teacher": str(plan.teacher.resolve()), "problems": len(plan.problems),
            "samples_per_expert": cfg.traces.samples_per_expert, "keep_per_problem": cfg.traces.keep_per_problem,
            "files": {e: str(store.trace_file(e).resolve()) for e in store.expert_ids},
            "experts": {e: t.as_dict() for e, t in store.tallies.items()}}


def _report(cfg: MemlConfig, plan: TracesPlan, store: TraceStore, recipe: Optional[str]) -> dict[str, Any]:
    summary = _summary(cfg, plan, store)
    write_atomic(store.out_dir / SUMMARY, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    for eid, t in store.tallies.items():
        print(f"[traces] {eid}: {t.problems_with_trace}/{t.problems} problems with a trace, {t.traces_kept} traces "
              f"kept, {t.samples_drawn} samples drawn, yield {t.yield_:.3f} (correct/drawn; "
              f"{t.statuses.get('no_answer', 0)} without an answer, {t.skipped_long_prompts} prompts too long)",
              flush=True)
    if not store.complete:
        print(f"[traces] stopped after chunk {store.chunks_done}/{store.num_chunks}; run the same command again "
              f"to continue (progress in {store.out_dir})", flush=True)
        return summary
    fragment = traces_fragment(store)
    write_atomic(store.out_dir / FRAGMENT, yaml.safe_dump(fragment, sort_keys=False))
    overrides = " ".join(shlex.quote(f"experts.teacher_traces.{e}={p}")
                         for e, p in fragment["experts"]["teacher_traces"].items())
    print(f"[traces] done: {store.out_dir / SUMMARY}. MEF on these traces:\n  meml sft "
          f"{shlex.quote(recipe) if recipe else 'RECIPE'} {overrides}\nor put {store.out_dir / FRAGMENT} into the "
          "recipe:\n"
          + yaml.safe_dump(fragment, sort_keys=False), end="", flush=True)
    return summary


def run_traces(cfg: MemlConfig, recipe: Optional[str] = None) -> dict[str, Any]:
    """``meml traces``: draw (or continue drawing) the teacher traces; returns the summary."""
    plan = plan_traces(cfg)
    fp = fingerprint(cfg, plan)
    store = TraceStore.open(plan.out_dir, [e.id for e in plan.chosen], plan.num_chunks, cfg.traces.save_samples, fp)
    if store.chunks_done:
        print(f"[traces] continuing {plan.out_dir} at chunk {store.chunks_done}/{store.num_chunks}", flush=True)
    if not store.complete:
        _draw_all(cfg, plan, store, fp)
    return _report(cfg, plan, store, recipe)
