"""``meml export``: a run's trained model as a Hugging Face directory for serving, optionally FP8-quantised.

The weights come from the run's ``final_model/`` (or a ``checkpoints/step_*`` directory) through the checkpoint
converter (``checkpoints_convert.convert.megatron_to_hf_dir``: any TP/PP, the stored dtype). config.json and the
tokenizer come from the first of: the run's ``rollout_model/`` (written when the run started a rollout engine),
the run's ``model.hf_path``, or, for the synthetic family, a config.json built from the run's model shape plus the
synthetic character tokenizer.

``--fp8``: post-training FP8 (E4M3, per-tensor scales) with nvidia-modelopt: ``mtq.FP8_DEFAULT_CFG``, max
calibration over prompt + gold answer sequences of the run's own training data, then modelopt's unified HF export
(FP8 weights, ``weight_scale`` / ``input_scale`` per linear layer, ``quantization_config`` with
``quant_method: modelopt`` in config.json, ``hf_quant_config.json``), the format vLLM (``quantization=modelopt``)
and TensorRT-LLM serve on GPUs.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM

from checkpoints_convert.convert import megatron_to_hf_dir
from checkpoints_convert.hf_io import SIDE_FILES, prepare_out_dir
from checkpoints_convert.mapping import ConvertError
from megatron_meml.config import MemlConfig, load_config
from megatron_meml.errors import ConfigError, ExportError, UserError
from megatron_meml.model.arch import arch_from_model_config
from megatron_meml.model.hf_config import hf_config_dict
from megatron_meml.stages.inputs import build_experts, load_data
from megatron_meml.stages.paths import STAGE_CONFIGS, RunPaths


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """What ``meml export`` reads and writes."""

    run_dir: str
    """Run directory written by ``meml sft`` / ``meml train`` (``<output_dir>/<run_name>``)."""
    out: str
    """Output directory of the Hugging Face checkpoint (must be empty unless ``overwrite``)."""
    checkpoint: Optional[str] = None
    """Megatron checkpoint to export instead of ``final_model``: a path, a ``step_*`` name under
    ``RUN_DIR/checkpoints`` or ``latest``."""
    fp8: bool = False
    """Quantise to FP8 with nvidia-modelopt (post-training, max calibration)."""
    overwrite: bool = False
    """Replace the contents of a non-empty ``out``."""
    calib_samples: int = 32
    """FP8 calibration sequences (expert prompt + gold answer of the run's training problems, experts in turn)."""

    def __post_init__(self) -> None:
        if self.calib_samples < 1:
            raise ValueError(f"export calib_samples must be >= 1, got {self.calib_samples}")


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What was written."""

    out: Path
    """The Hugging Face directory."""
    source: Path
    """The Megatron checkpoint it was made from."""
    side_files: str
    """Where config.json and the tokenizer came from (a directory, or 'synthesised from <config>')."""
    dtype: str
    """Dtype of the unquantised weights (the checkpoint's)."""
    fp8_layers: int = 0
    """Linear layers stored in FP8 (0 without ``fp8``)."""


def run_config(run_dir: Path) -> tuple[Path, MemlConfig]:
    """The run's resolved recipe (``config.<stage>.yaml``) and its config."""
    if not run_dir.is_dir():
        raise ExportError(f"run directory '{run_dir}' does not exist (it is <output_dir>/<run_name> of a "
                          "`meml sft` or `meml train` run)")
    paths = RunPaths(run_dir)
    path = next((paths.config(s) for s in STAGE_CONFIGS if paths.config(s).is_file()), None)
    if path is None:
        names = ", ".join(paths.config(s).name for s in STAGE_CONFIGS)
        raise ExportError(f"'{run_dir}' has none of {names}: it is not a megatron-meml run directory (pass "
                          "<output_dir>/<run_name>)")
    try:
        return path, load_config(path)
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from None


def model_source(run_dir: Path, checkpoint: Optional[str]) -> Path:
    """The Megatron dist checkpoint to export: ``final_model`` or the ``--checkpoint`` one."""
    ckpts = RunPaths(run_dir).checkpoints
    if checkpoint is None:
        path = RunPaths(run_dir).final_model
        if not path.is_dir():
            have = sorted(p.name for p in ckpts.glob("step_*") if p.is_dir()) if ckpts.is_dir() else []
            hint = (f"; export a step checkpoint with --checkpoint (have: {', '.join(have)})" if have else
                    "; the run has not finished (final_model is written after the last step)")
            raise ExportError(f"'{path}' does not exist{hint}")
    elif checkpoint == "latest":
        marker = ckpts / "latest"
        if not marker.is_file():
            raise ExportError(f"--checkpoint latest: '{marker}' does not exist (the run saved no checkpoint)")
        path = ckpts / marker.read_text().strip()
    else:
        path = Path(checkpoint) if Path(checkpoint).is_dir() else ckpts / checkpoint
        if not path.is_dir():
            raise ExportError(f"--checkpoint '{checkpoint}' is neither a directory nor a checkpoint under '{ckpts}'")
    if not (path / ".metadata").is_file():
        raise ExportError(f"'{path}' is not a complete Megatron dist checkpoint (no .metadata)")
    return path


def side_files_dir(run_dir: Path, cfg: MemlConfig, staging: Path) -> tuple[Path, str]:
    """(directory holding config.json + tokenizer files, where they came from)."""
    rollout = RunPaths(run_dir).rollout_model
    if (rollout / "config.json").is_file():
        return rollout, str(rollout)
    if cfg.model.hf_path is not None:
        hf = Path(cfg.model.hf_path)
        if not (hf / "config.json").is_file():
            raise ExportError(f"the run has no '{rollout}' and its model.hf_path '{hf}' has no config.json: "
                              "config.json and the tokenizer come from there; make that directory available")
        return hf, str(hf)
    _write_synthetic_side_files(cfg, staging)
    return staging, "synthesised from the run's model.* shape and the synthetic tokenizer"


def _write_synthetic_side_files(cfg: MemlConfig, out: Path) -> None:
    """config.json, generation_config.json and tokenizer of a run without ``model.hf_path`` (synthetic family)."""
    try:
        tok = build_experts(cfg).tokenizer
    except UserError as e:
        raise ExportError(str(e)) from None
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = hf_config_dict(arch_from_model_config(cfg.model), bos=tok.bos_token_id, eos=tok.eos_token_id,
                            pad=tok.pad_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(ids))
    tok.save_pretrained(str(out))


def export_run(cfg: ExportConfig) -> ExportResult:
    """Export a run's model as a Hugging Face directory (FP8 with ``cfg.fp8``)."""
    run_dir, out = Path(cfg.run_dir), Path(cfg.out)
    _, run_cfg = run_config(run_dir)
    source = model_source(run_dir, cfg.checkpoint)
    try:
        prepare_out_dir(out, cfg.overwrite)  # refuse a non-empty --out before any work
        with tempfile.TemporaryDirectory(prefix="meml-export-") as tmp:
            side, origin = side_files_dir(run_dir, run_cfg, Path(tmp))
            hf_out = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) if cfg.fp8 else out
            try:
                meta = megatron_to_hf_dir(source, hf_out, config=side, overwrite=True)
                layers = 0
                if cfg.fp8:
                    layers = quantize_fp8(hf_out, out, calibration_sequences(run_cfg, cfg.calib_samples))
            finally:
                if cfg.fp8:
                    shutil.rmtree(hf_out, ignore_errors=True)
    except ConvertError as e:
        raise ExportError(f"{source}: {e}") from None
    return ExportResult(out=out, source=source, side_files=origin, dtype=meta["dtype"], fp8_layers=layers)


def calibration_sequences(cfg: MemlConfig, n: int) -> list[list[int]]:
    """``n`` token-id sequences, expert prompt + gold answer + EOS, of the run's first training problems
    (experts in turn), cut to the model's positions."""
    try:
        experts = build_experts(cfg)
        problems = load_data(cfg).train
    except (UserError, FileNotFoundError) as e:
        raise ExportError(f"FP8 calibration reads the run's training data and tokenizer: {e}") from None
    limit = arch_from_model_config(cfg.model).max_position_embeddings
    seqs = []
    for i in range(n):
        k, problem = i % len(experts), problems[(i // len(experts)) % len(problems)]
        seqs.append(experts.sft_example(k, problem, experts.gold_response(k, problem)).tokens[:limit])
    return seqs


def quantize_fp8(hf_dir: Path, out: Path, sequences: list[list[int]]) -> int:
    """modelopt FP8 post-training quantisation of the HF model in ``hf_dir``, calibrated on ``sequences``,
    exported to ``out`` with the tokenizer files. Returns the number of FP8 linear layers."""
    mtq, export_hf_checkpoint = _modelopt()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype="auto").to(device).eval()
    model = fp8_fake_quantize(model, sequences, mtq)
    layers = sum(1 for m in fp8_linears(model))
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(out))
    for name in SIDE_FILES:  # the tokenizer (modelopt writes config.json and generation_config.json itself)
        if (hf_dir / name).is_file() and not (out / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
    return layers


def fp8_fake_quantize(model: Any, sequences: list[list[int]], mtq: Any = None) -> Any:
    """Insert modelopt FP8 quantisers (``FP8_DEFAULT_CFG``: per-tensor E4M3 weights and inputs of every linear
    layer but ``lm_head``) and set their amax by running ``sequences`` through the model (max calibration).
    Returns the fake-quantised model; on CPU its forward simulates FP8 rounding in the model's dtype."""
    mtq = mtq or _modelopt()[0]
    device = next(model.parameters()).device

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for ids in sequences:
                m(torch.tensor([ids], device=device))

    return mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)


def fp8_linears(model: Any):
    """(name, module) of each layer whose weight and input quantisers are enabled."""
    for name, m in model.named_modules():
        wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
        if wq is not None and iq is not None and wq.is_enabled and iq.is_enabled:
            yield name, m


def _modelopt() -> tuple[Any, Any]:
    # nvidia-modelopt is an optional extra (`[export]`): imported only when --fp8 asks for it
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as e:
        raise ExportError(f"--fp8 needs nvidia-modelopt (pip install nvidia-modelopt): {e}") from None
    return mtq, export_hf_checkpoint


def run_export(cfg: ExportConfig) -> int:
    """CLI body: export and print what was written (a user error reaches the CLI as ExportError)."""
    res = export_run(cfg)
    what = f"FP8 ({res.fp8_layers} linear layers, modelopt)" if cfg.fp8 else res.dtype
    print(f"meml export: {res.source} -> {res.out} ({what}); config.json and tokenizer: {res.side_files}")
    return 0
