"""Logits parity between a HF model and its Megatron conversion, on the same token ids, at any TP/PP."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from checkpoints_convert.convert import check_layout, load_arch
from checkpoints_convert.dist_ckpt import READ_ERRORS, read_metadata, unreadable
from checkpoints_convert.mapping import ConvertError

# Pass rule (docs/convert.md): max |logit diff| <= rtol x max |HF logit| and mean KL <= kl_tol. The diff is judged
# against the logits' own scale because rounding noise scales with it; fp32 rtol 1e-4 is ~1000 x fp32 epsilon and
# 25 x the reduction-order noise of a 30-layer model at TP=3 (4e-6), while wrong mappings measured >= 0.2.
DEFAULT_RTOL = {"fp32": 1e-4, "bf16": 0.25}
DEFAULT_KL_TOL = {"fp32": 1e-6, "bf16": 2e-2}


@dataclass(frozen=True, kw_only=True)
class VerifyConfig:
    """What to compare and how."""

    hf: str
    """HF model directory (config.json, safetensors, optional tokenizer)."""
    megatron: str
    """Megatron dist-checkpoint directory."""
    tp: int = 1
    """Tensor-parallel size of the Megatron run."""
    pp: int = 1
    """Pipeline-parallel size of the Megatron run."""
    dtype: str = "fp32"
    """Compute dtype of both models: fp32 or bf16."""
    prompts: Optional[str] = None
    """Text file, one prompt per line (needs the tokenizer in ``hf``); None: seeded random token ids."""
    rtol: Optional[float] = None
    """Largest allowed max |logit diff| as a fraction of max |HF logit|; None: 1e-4 for fp32, 0.25 for bf16."""
    tol: Optional[float] = None
    """Absolute max |logit diff| allowed instead of the ``rtol`` bound; None: use ``rtol``."""
    kl_tol: Optional[float] = None
    """Largest allowed mean KL(HF || Megatron) per token; None: 1e-6 for fp32, 2e-2 for bf16."""
    num_random: int = 4
    """Random sequences when no prompts are given."""
    seq_len: int = 32
    """Length of each random sequence."""
    seed: int = 0
    """Seed of the random token ids."""

    def __post_init__(self) -> None:
        if self.dtype not in DEFAULT_RTOL:
            raise ValueError(f"verify dtype must be one of {tuple(DEFAULT_RTOL)}, got '{self.dtype}'")
        if self.tp < 1 or self.pp < 1 or self.num_random < 1 or self.seq_len < 1:
            raise ValueError("verify tp, pp, num_random and seq_len must be >= 1")
        for name in ("rtol", "tol", "kl_tol"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"verify {name} must be > 0, got {getattr(self, name)}")

    @property
    def limits(self) -> "Limits":
        return Limits(rtol=DEFAULT_RTOL[self.dtype] if self.rtol is None else self.rtol, atol=self.tol,
                      kl=DEFAULT_KL_TOL[self.dtype] if self.kl_tol is None else self.kl_tol)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The pass rule's thresholds."""

    rtol: float
    """max |logit diff| allowed per unit of max |HF logit|."""
    atol: Optional[float] = None
    """Absolute max |logit diff| allowed; replaces the rtol bound when set."""
    kl: float
    """Mean KL(HF || Megatron) per token allowed, in nats."""


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    """Figures over every position of every sequence."""

    max_abs_diff: float
    """max |logit_HF - logit_Megatron|."""
    logit_scale: float
    """max |logit_HF|, the scale the difference is judged against."""
    mean_kl: float
    """Mean over tokens of KL(p_HF || p_Megatron), in nats."""
    greedy_agreement: float
    """Fraction of positions where both argmax tokens agree."""
    tokens: int
    """Positions compared."""
    limits: Limits
    """Thresholds applied."""

    @property
    def relative_diff(self) -> float:
        """max |logit diff| / max |HF logit|."""
        return self.max_abs_diff / self.logit_scale if self.logit_scale > 0 else float("inf")

    @property
    def bound(self) -> float:
        """The max |logit diff| allowed: ``atol``, else ``rtol`` x max |HF logit|."""
        return self.limits.atol if self.limits.atol is not None else self.limits.rtol * self.logit_scale

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.bound and self.mean_kl <= self.limits.kl

    def lines(self, cfg: VerifyConfig) -> list[str]:
        rule = (f"absolute --tol {self.bound:.1e}" if self.limits.atol is not None else
                f"rtol {self.limits.rtol:.2g} x max |logit| {self.logit_scale:.1f} = {self.bound:.1e}")
        return [f"verify {cfg.dtype} tp={cfg.tp} pp={cfg.pp}: {self.tokens} tokens",
                f"  max |logit diff|      {self.max_abs_diff:.3e} = {self.relative_diff:.1e} x max |logit|"
                f"  (allowed: {rule})",
                f"  mean KL(HF||Megatron) {self.mean_kl:.3e} nats/token  (allowed {self.limits.kl:.2g})",
                f"  greedy agreement      {self.greedy_agreement:.4f}",
                f"  {'PASS' if self.passed else 'FAIL'}"]


def compare(hf: list[torch.Tensor], meg: list[torch.Tensor], limits: Limits) -> ParityReport:
    """Parity figures of per-sequence logits [T, V] (compared in float64)."""
    a = torch.cat([x.double() for x in hf])
    b = torch.cat([x.double() for x in meg])
    if a.shape != b.shape:
        raise ConvertError(f"logit shapes differ: HF {tuple(a.shape)} vs Megatron {tuple(b.shape)}")
    lp, lq = a.log_softmax(-1), b.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    agree = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return ParityReport(max_abs_diff=(a - b).abs().max().item(), logit_scale=a.abs().max().item(),
                        mean_kl=kl.mean().item(), greedy_agreement=agree, tokens=a.shape[0], limits=limits)


def token_ids(cfg: VerifyConfig, vocab_size: int) -> list[torch.Tensor]:
    """[1, T] id tensors: the tokenised prompts, or seeded random ids."""
    if cfg.prompts is None:
        g = torch.Generator().manual_seed(cfg.seed)
        return [torch.randint(0, vocab_size, (1, cfg.seq_len), generator=g) for _ in range(cfg.num_random)]
    path = Path(cfg.prompts)
    if not path.is_file():
        raise ConvertError(f"--prompts file '{path}' does not exist")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ConvertError(f"--prompts file '{path}' has no non-empty lines")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.hf)
    except (OSError, ValueError) as e:
        raise ConvertError(f"--prompts needs the tokenizer files in '{cfg.hf}': {e}") from None
    return [torch.tensor([tok(line)["input_ids"]]) for line in lines]


def _forward_step(data_iterator, model):
    from megatron_meml.model.provider import causal_mask

    tokens = next(data_iterator)
    t, dev = tokens.shape[1], tokens.device
    return model(tokens, torch.arange(t, device=dev)[None], causal_mask(t, dev)), None


def megatron_logits(model, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[T, V] logits of one sequence on the last pipeline stage (TP-gathered), None on other stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter([ids]), model=[model],
                                          num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1,
                                          forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(out[0])[0].float().cpu()


def _load(model, ckpt: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
    except (CheckpointingException, *READ_ERRORS) as e:
        raise unreadable(ckpt, e) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConvertError(f"checkpoint '{ckpt}' does not fit the model: missing {missing}, unexpected {unexpected}")


def verify_rank(cfg: VerifyConfig) -> Optional[ParityReport]:
    """One rank's part (process group not yet initialised); every rank returns the same report."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_meml.model.config import ModelConfig
    from megatron_meml.model.cpu_compat import install_cpu_shim
    from megatron_meml.model.provider import build_model
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.distributed import destroy_distributed, init_distributed

    _, arch = load_arch(Path(cfg.hf))
    install_cpu_shim()
    par = ParallelConfig(tp=cfg.tp, pp=cfg.pp)
    _, world = init_distributed(par)
    try:
        if world != cfg.tp * cfg.pp:
            raise ConvertError(f"verify needs exactly tp x pp = {cfg.tp * cfg.pp} ranks, got {world}")
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.manual_seed(cfg.seed)
        model_parallel_cuda_manual_seed(cfg.seed)  # dropout RNG tracker the attention expects (dropout is 0)
        model = build_model(arch, ModelConfig(hf_path=cfg.hf, dtype=cfg.dtype, layer_spec="local"), par)
        _load(model, cfg.megatron)
        model.eval()
        batches = token_ids(cfg, arch.vocab_size)
        meg = [megatron_logits(model, ids) for ids in batches]
        report = None
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            report = compare(_hf_logits(cfg, batches), meg, cfg.limits)
        reports = [None] * world
        dist.all_gather_object(reports, report)
        return next(r for r in reports if r is not None)
    finally:
        destroy_distributed()


def _hf_logits(cfg: VerifyConfig, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(cfg.hf, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return [model(ids).logits[0].float() for ids in batches]


def verify(cfg: VerifyConfig) -> ParityReport:
    """Run the parity check on tp x pp ranks (spawned here unless under torchrun)."""
    from checkpoints_convert.launch import run_ranks

    _, arch = load_arch(Path(cfg.hf))
    check_layout(arch, cfg.tp, cfg.pp)
    read_metadata(Path(cfg.megatron))  # a missing or foreign directory fails here, in one line, before any rank
    return run_ranks(verify_rank, cfg.tp * cfg.pp, cfg)[0]
