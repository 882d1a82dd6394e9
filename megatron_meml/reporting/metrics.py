"""Metric sinks (JSONL, TensorBoard, Weights & Biases), progress lines, phase timers, and the cross-rank reductions.

Metric names are namespaced (``rollout/``, ``reward/``, ``train/``, ``expert/<id>/``, ``hard/``, ``timing/``,
``weight_sync/``, ``memory/``, ``eval/``); :data:`REDUCTIONS` holds the one rule by which each is combined across ranks.

Where each metric goes, for ``logger.log(step, metrics, stage=...)``:

* ``<run_dir>/metrics.jsonl``: one JSON object per call, ``{"stage", "step", "time", <name>: value ...}``, flushed
  and fsynced per line. ``read_metrics`` reads it back.
* TensorBoard: one run per stage (``<run_dir>/tb/sft``, ``tb/train``, ``tb/eval``), tag = the metric name
  unchanged. Stages count steps separately, so each gets its own run rather than a tag prefix; TensorBoard then
  overlays e.g. ``train/sft_nll`` of the SFT stage and of RIEL as two runs of one chart.
* Weights & Biases: key ``<stage>/<name>`` against a per-stage step axis ``<stage>/step``.

Samples of completions (``logger.log_samples(rows)``, ``logger.log_text(...)``) go to ``<run_dir>/samples.jsonl``
(one JSON object per row, with the same resume truncation as metrics.jsonl) and to TensorBoard text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_meml.atomic_file import atomic_write
from megatron_meml.errors import DataError, RunError
from megatron_meml.reporting.config import LoggingConfig

STAGES = ("sft", "train", "eval")
"""The stages a metrics line may belong to; each has its own step counter."""
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
"""One line per sampled completion: a dataclass row with ``stage`` and ``step`` fields (``samples.Sample``)."""
RESERVED = ("stage", "step", "time")
"""Fields of every metrics line; no metric may use these names."""

REDUCTIONS: dict[str, str] = {
    # Per-rank rollout statistics over equal-sized rank shards: the mean of rank means is the global mean.
    "rollout/": "mean",
    "rollout/num_samples": "sum",
    "rollout/num_prompts": "sum",
    "rollout/tokens": "sum",
    "rollout/mutual_pairs": "sum",  # counts, comparable with train/mutual_active_pairs (already a global sum)
    "rollout/train_rows": "sum",
    "reward/": "mean",
    "expert/": "mean",
    # The trainer already reduces train/* over DP and broadcasts over PP (identical on every rank); the
    # rollout/train mismatch is per rank. The mean is right for both.
    "train/": "mean",
    # Every rank holds the whole hard-example store (identical state): take the last rank's value.
    "hard/": "last",
    # The slowest rank sets the step time.
    "timing/": "max",
    "weight_sync/": "max",
    "weight_sync/bytes": "sum",
    # Peak memory: the largest rank's.
    "memory/": "max",
    # Accuracy over equal-sized eval shards; counts add up.
    "eval/": "mean",
    "eval/num_problems": "sum",
    "eval/num_dev_problems": "sum",
}
"""Metric name or namespace prefix (ending in "/") -> how it combines across ranks: sum, mean, max or last (the
value of the highest rank that has it). The longest matching entry wins; a name that matches none is an error."""

_OPS = ("sum", "mean", "max", "last")
assert all(op in _OPS for op in REDUCTIONS.values())


def reduction_for(name: str) -> str:
    """The REDUCTIONS rule for one metric name (full-name entry first, then the longest matching prefix)."""
    if name in REDUCTIONS:
        return REDUCTIONS[name]
    best = max((p for p in REDUCTIONS if p.endswith("/") and name.startswith(p)), key=len, default=None)
    if best is None:
        spaces = sorted({p.split("/")[0] + "/" for p in REDUCTIONS})
        raise KeyError(f"metric '{name}' has no reduction rule: its name must start with one of {spaces} "
                       "(or add it to megatron_meml.reporting.metrics.REDUCTIONS)")
    return REDUCTIONS[best]


def _reduce_column(values: torch.Tensor, present: torch.Tensor, op: str) -> float:
    """Combine one metric's [world] values over the ranks where ``present``."""
    v = values[present]
    if op == "sum":
        return float(v.sum())
    if op == "mean":
        return float(v.sum() / v.numel())
    if op == "max":
        return float(v.max())
    return float(v[-1])


def reduce_across_ranks(metrics: Mapping[str, float], group: Any = None) -> dict[str, float]:
    """Combine every rank's metrics by the REDUCTIONS table (collective over ``group``; None: the world).

    Key sets are gathered first; a rank that lacks a key is left out of that key's reduction (a mean is over the
    ranks that have it). Every rank returns the same dict. Without an initialised process group (or with one
    rank) the rules are still checked and the values returned as floats.
    """
    local = {k: _as_float(k, v) for k, v in metrics.items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        for k in local:
            reduction_for(k)
        return dict(sorted(local.items()))
    world = dist.get_world_size(group)
    key_sets: list = [None] * world
    dist.all_gather_object(key_sets, sorted(local), group=group)
    keys = sorted(set().union(*key_sets))
    ops = [reduction_for(k) for k in keys]  # raises identically on every rank: no rank is left in a collective
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    row = torch.tensor([[local.get(k, 0.0) for k in keys], [float(k in local) for k in keys]],
                       dtype=torch.float64, device=device)
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).cpu()  # [world, 2, n]
    values, present = table[:, 0], table[:, 1] > 0
    return {k: _reduce_column(values[:, i], present[:, i], op) for i, (k, op) in enumerate(zip(keys, ops))}


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric '{name}' must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric '{name}' must be a number, got {type(value).__name__}: {value!r}") from None


def memory_metrics() -> dict[str, float]:
    """memory/peak_rss_gb: this process's peak resident memory so far (GiB; with one rank it includes the
    in-process rollout engine); memory/gpu_peak_allocated_gb and memory/gpu_peak_reserved_gb with CUDA."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    m = {"memory/peak_rss_gb": peak / (2**30 if sys.platform == "darwin" else 2**20)}
    if torch.cuda.is_available():
        m["memory/gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        m["memory/gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return m


# ------------------------------------------------------------------------------------------------------ timers
class PhaseTimers:
    """Wall-clock seconds per phase: ``with timers("rollout"): ...`` adds to ``timing/rollout``; ``pop()`` returns
    and resets the totals. With ``cuda_sync`` (and CUDA present) the device is synchronised at each boundary so
    asynchronous kernels count in the phase that launched them."""

    def __init__(self, *, cuda_sync: bool = False) -> None:
        self.cuda_sync = cuda_sync and torch.cuda.is_available()
        self._totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda_sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda_sync:
                torch.cuda.synchronize()
            key = f"timing/{name}"
            self._totals[key] = self._totals.get(key, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """``{"timing/<name>": seconds}`` accumulated since the last pop."""
        out, self._totals = self._totals, {}
        return out


# ------------------------------------------------------------------------------------------------------ jsonl
def _parse_lines(path: Path) -> tuple[list[dict], bool]:
    """(records, torn): a last line that does not parse (a crash mid-write) is dropped with a warning."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    records: list[dict] = []
    torn = False
    for i, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "stage" not in rec or "step" not in rec:
                raise ValueError("not a metrics record")
        except ValueError as e:
            if i == len(lines):
                warnings.warn(f"{path}: line {i} is incomplete (a run stopped mid-write); it is skipped",
                              stacklevel=3)
                torn = True
                break
            raise DataError(f"{path}: line {i} is not a metrics record ({e}); fix or remove that line") from None
        records.append(rec)
    return records, torn


def read_jsonl(path: Path | str) -> list[dict]:
    """Every record (a JSON object with ``stage`` and ``step``) of a run's JSONL file (metrics or samples), in file
    order; a torn last line is skipped with a warning, any other bad line is an error naming it."""
    return _parse_lines(Path(path))[0]


def read_metrics(run_dir: Path | str) -> list[dict]:
    """Every record of ``<run_dir>/metrics.jsonl`` in file order (a torn last line is skipped with a warning)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"{path} does not exist: is {run_dir} a run directory of `meml sft` / "
                                "`meml train` (with logging.jsonl=true)?")
    return _parse_lines(path)[0]


def _rewrite_atomic(path: Path, records: Sequence[dict]) -> None:
    atomic_write(path, "".join(json.dumps(rec) + "\n" for rec in records).encode("utf-8"))


# ------------------------------------------------------------------------------------------------------ progress
PROGRESS_FIELDS = (("loss", "train/loss"), ("loss", "train/sft_nll"), ("reward", "reward/mean"),
                   ("hard", "hard/size"), ("mismatch", "train/mismatch_abs"))
"""(label, metric) pairs of the progress line, in order; a label shows once, from its first metric present."""


def _num(v: float) -> str:
    return f"{v:.4g}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _expert_rewards(metrics: Mapping[str, float]) -> list[str]:
    out = []
    for k in sorted(metrics, key=natural_key):
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "expert" and parts[2] == "reward_mean":
            out.append(f"{parts[1]}:{_num(float(metrics[k]))}")
    return out


def natural_key(key: str) -> list:
    """Sort key that orders expert/2 before expert/10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def format_progress(step: int, total: int, metrics: Mapping[str, float], *, stage: str,
                    sec_per_step: Optional[float]) -> str:
    """One progress line: ``[train] step 12/300 | loss 0.1234 | reward 0.25 | experts 0:0.1 1:0.05 | hard 64 |
    mismatch 0.0012 | 3.21 s/step | ETA 15:24`` (fields absent from ``metrics`` are left out)."""
    parts = [f"[{stage}] step {step}/{total}"]
    shown: set[str] = set()
    for label, key in PROGRESS_FIELDS:
        if label in shown or key not in metrics:
            continue
        shown.add(label)
        parts.append(f"{label} {_num(float(metrics[key]))}")
        if label == "reward":
            experts = _expert_rewards(metrics)
            if experts:
                parts.append("experts " + " ".join(experts))
    accs = [float(v) for k, v in metrics.items()
            if k.startswith("eval/") and not k.startswith("eval/dev/") and k.endswith("/accuracy")]
    if accs:
        parts.append(f"eval acc mean {_num(sum(accs) / len(accs))}")
    if sec_per_step is not None:
        parts.append(f"{sec_per_step:.2f} s/step")
        parts.append(f"ETA {_duration(max(total - step, 0) * sec_per_step)}")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------------------ logger
class MetricsLogger:
    """All sinks of one run directory. With ``enabled=False`` (every rank but the writer) each method does
    nothing. With ``resume_step``, lines of ``resume_stages`` past that step are dropped (the run goes on from
    the checkpoint of that step) and TensorBoard hides that stage's later events."""

    def __init__(self, run_dir: Path | str, cfg: LoggingConfig, *, enabled: bool = True,
                 resume_step: Optional[int] = None, resume_stages: Sequence[str] = ("train",)) -> None:
        self.run_dir, self.cfg, self.enabled = Path(run_dir), cfg, enabled
        self.resume_step, self.resume_stages = resume_step, tuple(resume_stages)
        for s in self.resume_stages:
            _check_stage(s)
        self._file = None
        self._samples_file = None
        self._tb: dict[str, Any] = {}
        self._wandb: Any = None
        self._bar: Any = None
        self._first_tick: Optional[tuple[float, int]] = None
        self._created = time.monotonic()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self._open_jsonl()
        if (self.run_dir / SAMPLES_FILE).exists():  # cut now (a resumed run may log no samples); else on first use
            self._samples_file = self._open_appending(SAMPLES_FILE)
        if cfg.wandb:
            self._wandb = _start_wandb(self.run_dir, cfg)

    def _open_jsonl(self) -> None:
        self._file = self._open_appending(METRICS_FILE)

    def _open_appending(self, name: str) -> Any:
        """``<run_dir>/<name>`` for appending, first dropping a torn last line and the lines after the resume step."""
        path = self.run_dir / name
        if path.exists():
            records, torn = _parse_lines(path)
            keep = [r for r in records if not self._after_resume(r)]
            if torn or len(keep) != len(records):
                _rewrite_atomic(path, keep)
        return open(path, "a", encoding="utf-8")

    def _after_resume(self, rec: dict) -> bool:
        return (self.resume_step is not None and rec.get("stage") in self.resume_stages
                and int(rec["step"]) > self.resume_step)

    def log(self, step: int, metrics: Mapping[str, Any], *, stage: str) -> None:
        """Append one record to every enabled sink."""
        if not self.enabled:
            return
        _check_stage(stage)
        values = {}
        for k, v in metrics.items():
            if k in RESERVED:
                raise ValueError(f"metric name '{k}' is reserved for the record's own field; use a namespaced "
                                 "name such as 'train/...'")
            values[k] = _as_float(k, v)
        if self._file is not None:
            rec = {"stage": stage, "step": int(step), "time": time.time(), **values}
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        if self.cfg.tensorboard:
            tb = self._tb_writer(stage)
            for k, v in values.items():
                tb.add_scalar(k, v, global_step=int(step))
            tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in values.items()} | {f"{stage}/step": int(step)})

    def log_samples(self, rows: Sequence[Any]) -> None:
        """Append dataclass rows that carry ``stage`` and ``step`` fields to samples.jsonl, one line each."""
        if not self.enabled or not rows:
            return
        if self._samples_file is None:
            self._samples_file = self._open_appending(SAMPLES_FILE)
        for row in rows:
            rec = dataclasses.asdict(row)
            _check_stage(rec["stage"])
            self._samples_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._samples_file.flush()
        os.fsync(self._samples_file.fileno())

    def log_text(self, step: int, tag: str, text: str, *, stage: str) -> None:
        """A (markdown) text for TensorBoard's text tab: run ``tb/<stage>``, tag ``tag``."""
        if not self.enabled or not self.cfg.tensorboard:
            return
        _check_stage(stage)
        tb = self._tb_writer(stage)
        tb.add_text(tag, text, global_step=int(step))
        tb.flush()

    def _tb_writer(self, stage: str) -> Any:
        if stage not in self._tb:
            # imported when first used: logging.tensorboard=false runs never load TensorBoard
            from torch.utils.tensorboard import SummaryWriter

            purge = self.resume_step + 1 if self.resume_step is not None and stage in self.resume_stages else None
            self._tb[stage] = SummaryWriter(log_dir=str(self.run_dir / "tb" / stage), purge_step=purge)
        return self._tb[stage]

    def progress(self, step: int, total: int, metrics: Mapping[str, Any], *, stage: str) -> None:
        """Show this step: one printed line (``progress: line``) or a tqdm bar (``progress: bar``)."""
        if not self.enabled or self.cfg.progress == "off":
            return
        sec = self._sec_per_step(step)
        values = {k: _as_float(k, v) for k, v in metrics.items()}
        if self.cfg.progress == "line":
            print(format_progress(step, total, values, stage=stage, sec_per_step=sec), flush=True)
            return
        self._progress_bar(step, total, values, stage)

    def _sec_per_step(self, step: int) -> Optional[float]:
        """Mean seconds per step since the first progress call (which itself counts from the logger's creation),
        so one-off start-up work inflates only the first estimate."""
        now = time.monotonic()
        if self._first_tick is None:
            self._first_tick = (now, step)
            return now - self._created
        t0, s0 = self._first_tick
        return (now - t0) / (step - s0) if step > s0 else None

    def _progress_bar(self, step: int, total: int, values: dict[str, float], stage: str) -> None:
        if self._bar is None or self._bar.total != total or self._bar.desc != stage:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, initial=max(step - 1, 0), desc=stage, unit="step", dynamic_ncols=True)
        self._bar.update(step - self._bar.n)
        line = format_progress(step, total, values, stage=stage, sec_per_step=None)
        self._bar.set_postfix_str(line.split(" | ", 1)[1] if " | " in line else "", refresh=True)

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        for name in ("_file", "_samples_file"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        for tb in self._tb.values():
            tb.close()
        self._tb = {}
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"metrics stage must be one of {STAGES}, got '{stage}'")


def _start_wandb(run_dir: Path, cfg: LoggingConfig) -> Any:
    """A W&B run resumed by id across restarts, or None (with one warning) when wandb is not installed."""
    try:  # wandb is optional (not a dependency of the package)
        import wandb
    except ImportError:
        warnings.warn("logging.wandb=true but the wandb package is not installed; metrics go to metrics.jsonl "
                      "and TensorBoard only (pip install wandb to enable it)", stacklevel=3)
        return None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    has_mode = bool(os.environ.get("WANDB_MODE"))
    mode = None if has_mode or os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project=cfg.wandb_project or "megatron-meml", entity=cfg.wandb_entity, dir=str(run_dir),
                     name=run_dir.name, id=run_id, resume="allow", mode=mode)
    for stage in STAGES:
        run.define_metric(f"{stage}/step")
        run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
    return run

