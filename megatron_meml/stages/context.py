"""Set-up shared by every stage: parallel state, tokenizer and experts, data, model + optimizer, metrics, and the
rollout engine once a stage asks for it. ``RunContext`` is what the stages (``sft``, ``riel``, ``evaluate``) use."""
from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from checkpoints_convert.errors import ConvertError
from checkpoints_convert.hf_io import HFReader
from checkpoints_convert.mapping import shard_for_tp, to_global_name
from checkpoints_convert.mappings import hf_to_megatron
from megatron_meml.config import MemlConfig, to_yaml
from megatron_meml.distributed import destroy_distributed, init_distributed
from megatron_meml.errors import RunError
from megatron_meml.experts.expert_set import ExpertSet
from megatron_meml.model.arch import ArchSpec, arch_from_model_config
from megatron_meml.model.cpu_compat import install_cpu_shim
from megatron_meml.model.provider import unwrap
from megatron_meml.reporting.metrics import MetricsLogger, PhaseTimers
from megatron_meml.reporting.report import write_report
from megatron_meml.rollout.backend import Rollout
from megatron_meml.rollout.distributed import DistributedRollout
from megatron_meml.stages.inputs import build_experts, load_data, setup_threads
from megatron_meml.stages.paths import RunPaths
from megatron_meml.training.checkpoint import load_model_weights
from megatron_meml.training.setup import TrainState, build_reference, setup_training
from megatron_meml.training.trainer import Trainer
from megatron_meml.types import Problem

log = logging.getLogger("megatron_meml")


class StopFlag:
    """Set by SIGTERM (SLURM before preemption) or SIGUSR1: the stage checkpoints and exits at the end of the
    current step."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGUSR1, handler)

    def agreed(self) -> bool:
        """Collective: whether any rank was asked to stop (so every rank leaves at the same step)."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """Everything a stage needs, built once by ``setup_run``; ``with_rollout`` gives the same context with an
    engine."""

    cfg: MemlConfig
    paths: RunPaths
    arch: ArchSpec
    experts: ExpertSet
    train_problems: list[Problem]
    eval_problems: list[Problem]
    """The held-out test problems."""
    state: TrainState
    """DDP model chunks + optimizer."""
    trainer: Trainer
    logger: MetricsLogger
    timers: PhaseTimers
    stop: StopFlag
    dp_rank: int
    dp_size: int
    rank: int
    """Global rank (kept: an in-process vLLM engine tears the default process group down on shutdown)."""
    rollout: Optional[Rollout] = None
    """The rollout engine (every rank) after ``with_rollout``."""
    dev_problems: list[Problem] = field(default_factory=list)
    """Validation problems apart from the test problems (``data.dev_size``)."""

    @property
    def run_dir(self) -> Path:
        return self.paths.root

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @cached_property
    def problems_by_id(self) -> dict[str, Problem]:
        return {p.id: p for p in self.train_problems + self.eval_problems + self.dev_problems}

    @property
    def pad_id(self) -> int:
        return pad_id(self.experts)

    def with_rollout(self, version: int = 0) -> "RunContext":
        """Collective: the engine on the current weights; ``version``: the optimizer steps they have had (a
        resumed RIEL step)."""
        cfg = self.cfg
        engine = DistributedRollout.start(self.state.model, self.arch, self.experts.tokenizer, cfg.rollout,
                                          self.paths.rollout_model, dtype=cfg.model.dtype, seed=cfg.seed,
                                          version=version)
        return dataclasses.replace(self, rollout=engine)


def pad_id(experts: ExpertSet) -> int:
    tok = experts.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def init_model_weights(cfg: MemlConfig, ctx_state: Any, arch: ArchSpec) -> str:
    """Initial weights: model.megatron_path, else the HF safetensors in model.hf_path, else random (seeded)."""
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


def setup_run(cfg: MemlConfig, stage: str, *, resume_step: Optional[int] = None) -> RunContext:
    """Initialise everything for ``stage`` (sft | train | eval); collective."""
    setup_threads(cfg)
    install_cpu_shim()  # no-op with CUDA
    init_distributed(cfg.parallel)
    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed)
    paths = RunPaths.of(cfg)
    if dist.get_rank() == 0:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.config(stage).write_text(to_yaml(cfg))
    experts = build_experts(cfg)
    arch = arch_from_model_config(cfg.model)
    if len(experts.tokenizer) > arch.vocab_size:
        raise RunError(f"the tokenizer has {len(experts.tokenizer)} tokens but model.vocab_size is "
                       f"{arch.vocab_size}; raise model.vocab_size (a multiple of 64 x TP)")
    splits = load_data(cfg)
    lr = cfg.train.sft_lr if stage == "sft" else cfg.train.lr
    state = setup_training(arch, cfg.model, cfg.parallel, cfg.train, lr=lr)
    source = init_model_weights(cfg, state, arch)
    # the KL term's reference is the RIEL start: copied now, before a resume loads later weights
    reference = (build_reference(arch, cfg.model, cfg.parallel, state.model)
                 if stage == "train" and cfg.algo.kl_coef > 0 else None)
    trainer = Trainer(state, cfg.algo, micro_batch_size=cfg.train.micro_batch_size, pad_id=pad_id(experts),
                      max_tokens_per_micro_batch=cfg.train.max_tokens_per_micro_batch, reference=reference,
                      logits_at_scored_only=cfg.train.logits_at_scored_only,
                      log_term_grad_norms=cfg.train.log_term_grad_norms and stage == "train",
                      share_prompts=cfg.train.share_prompts)
    logger = MetricsLogger(paths.root, cfg.logging, enabled=dist.get_rank() == 0, resume_step=resume_step,
                           resume_stages=(stage, "eval"))
    ctx = RunContext(cfg=cfg, paths=paths, arch=arch, experts=experts, train_problems=splits.train,
                     eval_problems=splits.test, dev_problems=splits.dev, state=state, trainer=trainer, logger=logger,
                     timers=PhaseTimers(), stop=StopFlag(), dp_rank=ps.get_data_parallel_rank(),
                     dp_size=ps.get_data_parallel_world_size(), rank=dist.get_rank())
    if ctx.is_writer:
        log.info("run %s: stage %s, %d train / %d held-out / %d dev problems, experts %s, weights from %s",
                 paths.root, stage, len(splits.train), len(splits.test), len(splits.dev), experts.ids, source)
    return ctx


def close_run(ctx: RunContext) -> None:
    """Collective: stop the engine, close the metric sinks, write the report, leave the process groups."""
    if ctx.rollout is not None:
        ctx.rollout.shutdown()
    ctx.logger.close()
    if ctx.is_writer:
        paths = write_report(ctx.run_dir)
        print(f"[report] {len(paths)} files in {ctx.paths.report}", flush=True)
    destroy_distributed()
