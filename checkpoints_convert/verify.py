"""Logits parity between a HF model and its Megatron conversion, on the same token ids, at any TP/PP."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from checkpoints_convert.convert import check_layout, load_arch
from checkpoints_convert.mapping import ConvertError

DEFAULT_TOL = {"fp32": 1e-5, "bf16": 0.25}


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
    tol: Optional[float] = None
    """Largest allowed max |logit diff|; None: 1e-5 for fp32, 0.25 for bf16."""
    num_random: int = 4
    """Random sequences when no prompts are given."""
    seq_len: int = 32
    """Length of each random sequence."""
    seed: int = 0
    """Seed of the random token ids."""

    def __post_init__(self) -> None:
        if self.dtype not in DEFAULT_TOL:
            raise ValueError(f"verify dtype must be one of {tuple(DEFAULT_TOL)}, got '{self.dtype}'")
        if self.tp < 1 or self.pp < 1 or self.num_random < 1 or self.seq_len < 1:
            raise ValueError("verify tp, pp, num_random and seq_len must be >= 1")

    @property
    def tolerance(self) -> float:
        return DEFAULT_TOL[self.dtype] if self.tol is None else self.tol


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    """Figures over every position of every sequence."""

    max_abs_diff: float
    """max |logit_HF - logit_Megatron|."""
    mean_kl: float
    """Mean over tokens of KL(p_HF || p_Megatron), in nats."""
    greedy_agreement: float
    """Fraction of positions where both argmax tokens agree."""
    tokens: int
    """Positions compared."""
    tolerance: float
    """Threshold applied to ``max_abs_diff``."""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def lines(self, cfg: VerifyConfig) -> list[str]:
        return [f"verify {cfg.dtype} tp={cfg.tp} pp={cfg.pp}: {self.tokens} tokens",
                f"  max |logit diff|      {self.max_abs_diff:.3e}  (tolerance {self.tolerance:.1e})",
                f"  mean KL(HF||Megatron) {self.mean_kl:.3e} nats/token",
                f"  greedy agreement      {self.greedy_agreement:.4f}",
                f"  {'PASS' if self.passed else 'FAIL'}"]


def compare(hf: list[torch.Tensor], meg: list[torch.Tensor], tol: float) -> ParityReport:
    """Parity figures of per-sequence logits [T, V] (compared in float64)."""
    a = torch.cat([x.double() for x in hf])
    b = torch.cat([x.double() for x in meg])
    if a.shape != b.shape:
        raise ConvertError(f"logit shapes differ: HF {tuple(a.shape)} vs Megatron {tuple(b.shape)}")
    lp, lq = a.log_softmax(-1), b.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return ParityReport(max_abs_diff=(a - b).abs().max().item(), mean_kl=kl.mean().item(),
                        greedy_agreement=(a.argmax(-1) == b.argmax(-1)).double().mean().item(),
                        tokens=a.shape[0], tolerance=tol)


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

    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
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
    from megatron_meml.parallel import ParallelConfig, destroy_distributed, init_distributed

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
            report = compare(_hf_logits(cfg, batches), meg, cfg.tolerance)
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
    return run_ranks(verify_rank, cfg.tp * cfg.pp, cfg)[0]
