"""Set-up shared by every stage: parallel state, tokenizer and experts, data, model + optimizer, rollout engine,
hard-example store, metrics. ``RunContext`` is what the loops (``loop.py``, ``sft.py``, ``evaluate.py``) use."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_meml.config import MemlConfig, to_yaml
from megatron_meml.experts import ExpertSet, synthetic_expert_set
from megatron_meml.metrics import MetricsLogger, PhaseTimers
from megatron_meml.model.arch import ArchSpec, arch_from_model_config
from megatron_meml.types import Problem

log = logging.getLogger("megatron_meml")


class RunError(ValueError):
    """A user-fixable problem with the run's inputs; the message says what and where."""


@dataclass
class RunContext:
    """Everything a stage needs; built once by ``setup_run``."""

    cfg: MemlConfig
    run_dir: Path
    arch: ArchSpec
    experts: ExpertSet
    train_problems: list[Problem]
    eval_problems: list[Problem]
    state: Any
    """TrainState (DDP model chunks + optimizer)."""
    trainer: Any
    logger: MetricsLogger
    timers: PhaseTimers = field(default_factory=PhaseTimers)
    rollout: Any = None
    """DistributedRollout (every rank) once ``start_rollout`` ran."""
    dp_rank: int = 0
    dp_size: int = 1
    rank: int = 0
    """Global rank (kept: an in-process vLLM engine tears the default process group down on shutdown)."""
    stop_requested: bool = False
    """Set by SIGTERM/SIGUSR1: the loop checkpoints and exits at the end of the current step."""
    completions: int = 0
    """RIEL completions generated so far, all ranks (train.rollout_budget); kept in checkpoints."""
    ahead: Any = None
    """RolloutsAhead: the batches generated for the next steps (rollout.max_staleness > 0); kept in checkpoints."""

    @property
    def budget_spent(self) -> bool:
        budget = self.cfg.train.rollout_budget
        return budget > 0 and self.completions >= budget

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def problems_by_id(self) -> dict[str, Problem]:
        if not hasattr(self, "_by_id"):
            self._by_id = {p.id: p for p in self.train_problems + self.eval_problems}
        return self._by_id

    @property
    def pad_id(self) -> int:
        tok = self.experts.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from any values (independent of Python's hash randomisation and of rank layout)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def setup_threads(cfg: MemlConfig) -> None:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = cfg.train.threads or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(n)


def build_experts(cfg: MemlConfig) -> ExpertSet:
    k = cfg.algo.num_experts
    if cfg.data.source == "synthetic" and cfg.model.hf_path is None:
        return synthetic_expert_set(cfg.experts, k)
    if cfg.model.hf_path is None:
        raise RunError(f"data.source={cfg.data.source} needs a tokenizer: set model.hf_path to a Hugging Face "
                       "model directory (config.json + tokenizer files)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"could not load the tokenizer from model.hf_path '{cfg.model.hf_path}': {e}") from e
    return ExpertSet.from_config(cfg.experts, k, tok)


def load_data(cfg: MemlConfig) -> tuple[list[Problem], list[Problem]]:
    from megatron_meml.data.loaders import load_splits

    train, held_out = load_splits(cfg.data, cfg.seed if cfg.data.seed is None else cfg.data.seed)
    if not train:
        raise RunError(f"no training problems loaded from data.source={cfg.data.source} path={cfg.data.path}")
    return train, held_out


def init_model_weights(cfg: MemlConfig, ctx_state: Any, arch: ArchSpec) -> str:
    """Initial weights: model.megatron_path, else the HF safetensors in model.hf_path, else random (seeded)."""
    from megatron_meml.checkpoint import load_model_weights

    chunks = ctx_state.model
    if cfg.model.megatron_path:
        load_model_weights(Path(cfg.model.megatron_path), chunks)
        ctx_state.optimizer.reload_model_params()
        return f"megatron:{cfg.model.megatron_path}"
    if cfg.model.hf_path and list(Path(cfg.model.hf_path).glob("*.safetensors")):
        load_hf_weights(Path(cfg.model.hf_path), chunks, arch)
        ctx_state.optimizer.reload_model_params()
        return f"hf:{cfg.model.hf_path}"
    return "random"


def load_hf_weights(hf_dir: Path, chunks: list[Any], arch: ArchSpec) -> None:
    """Fill this rank's shards from a HF checkpoint, one tensor at a time, through the conversion tables.

    A missing, truncated or mis-shaped weight file is a RunError naming ``model.hf_path`` and the file.
    """
    from checkpoints_convert.errors import ConvertError
    from checkpoints_convert.hf_io import HFReader
    from checkpoints_convert.mapping import shard_for_tp, to_global_name
    from checkpoints_convert.mappings import hf_to_megatron
    from megatron.core import parallel_state as ps

    from megatron_meml.model.provider import unwrap

    try:
        reader = HFReader(hf_dir)
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        with torch.no_grad():
            for chunk in chunks:
                for name, p in unwrap(chunk).named_parameters():
                    full = hf_to_megatron(arch, to_global_name(name, arch.num_layers, pp, pp_rank), reader.get)
                    p.copy_(shard_for_tp(name, full, tp, tp_rank) if getattr(p, "tensor_model_parallel", False)
                            else full)
    except ConvertError as e:
        raise RunError(f"model.hf_path '{hf_dir}': {e}") from None


def setup_run(cfg: MemlConfig, stage: str, *, run_dir: Optional[Path] = None, lr: Optional[float] = None,
              resume_step: Optional[int] = None) -> RunContext:
    """Initialise everything for ``stage`` (sft | train | eval); collective."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_meml.model.cpu_compat import install_cpu_shim
    from megatron_meml.parallel import init_distributed
    from megatron_meml.training.setup import build_reference, setup_training
    from megatron_meml.training.trainer import Trainer

    setup_threads(cfg)
    install_cpu_shim()  # no-op with CUDA
    init_distributed(cfg.parallel)
    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed)
    run_dir = Path(run_dir or Path(cfg.output_dir) / cfg.run_name)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"config.{stage}.yaml").write_text(to_yaml(cfg))
    experts = build_experts(cfg)
    arch = arch_from_model_config(cfg.model)
    if len(experts.tokenizer) > arch.vocab_size:
        raise RunError(f"the tokenizer has {len(experts.tokenizer)} tokens but model.vocab_size is "
                       f"{arch.vocab_size}; raise model.vocab_size (a multiple of 64 x TP)")
    train, held_out = load_data(cfg)
    lr = lr if lr is not None else (cfg.train.sft_lr if stage == "sft" else cfg.train.lr)
    state = setup_training(arch, cfg.model, cfg.parallel, cfg.train, lr=lr)
    source = init_model_weights(cfg, state, arch)
    # the KL term's reference is the RIEL start: copied now, before a resume loads later weights
    reference = (build_reference(arch, cfg.model, cfg.parallel, state.model)
                 if stage == "train" and cfg.algo.kl_coef > 0 else None)
    trainer = Trainer(state, cfg.algo, micro_batch_size=cfg.train.micro_batch_size, pad_id=0,
                      max_tokens_per_micro_batch=cfg.train.max_tokens_per_micro_batch, reference=reference,
                      logits_at_scored_only=cfg.train.logits_at_scored_only,
                      log_term_grad_norms=cfg.train.log_term_grad_norms and stage == "train",
                      share_prompts=cfg.train.share_prompts)
    logger = MetricsLogger(run_dir, cfg.logging, enabled=dist.get_rank() == 0, resume_step=resume_step,
                           resume_stages=(stage, "eval"))
    ctx = RunContext(cfg=cfg, run_dir=run_dir, arch=arch, experts=experts, train_problems=train,
                     eval_problems=held_out, state=state, trainer=trainer, logger=logger,
                     dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                     rank=dist.get_rank())
    trainer.pad_id = ctx.pad_id
    if ctx.is_writer:
        log.info("run %s: stage %s, %d train / %d held-out problems, experts %s, weights from %s", run_dir,
                 stage, len(train), len(held_out), experts.ids, source)
    return ctx


def install_stop_handler(ctx: RunContext) -> None:
    """SIGTERM (SLURM before preemption) and SIGUSR1: finish the step, checkpoint, exit cleanly."""

    def handler(signum, frame):  # noqa: ARG001
        ctx.stop_requested = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGUSR1, handler)


def stop_agreed(ctx: RunContext) -> bool:
    """Whether any rank was asked to stop (so every rank leaves the loop at the same step)."""
    flag = torch.tensor([1.0 if ctx.stop_requested else 0.0])
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
