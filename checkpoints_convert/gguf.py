"""GGUF file -> Hugging Face fp32 safetensors directory (model, tokenizer with its chat template, generation config).

transformers' own GGUF loader does the reading and dequantisation (it needs the ``gguf`` package; the project
depends on it). ``save_pretrained`` refuses a model that still carries the GGUF ``quantization_config``, so the
dequantised weights are moved into a fresh model of the same config without it.
"""
from __future__ import annotations

from pathlib import Path

from checkpoints_convert.errors import ConvertError


def _load_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as e:
        raise ConvertError(f"reading {gguf.name} needs the 'gguf' package ({e}); run scripts/setup.sh "
                           "(or pip install gguf accelerate)") from None
    except (OSError, ValueError, KeyError) as e:
        raise ConvertError(f"{gguf}: transformers could not read it as a GGUF model "
                           f"({type(e).__name__}: {e})") from None
    return model, tokenizer


def _unquantised_copy(model):
    """A model of the same class and config without ``quantization_config``, holding ``model``'s weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores the norm epsilon as float32 (1e-5 reads back as 9.99999974e-06): write the value it stands for
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = model.generation_config
    return fresh.eval()


def gguf_to_hf(gguf: Path, out: Path, *, family: str) -> dict:
    """Write ``out`` (created; fp32 ``model.safetensors``, config.json, tokenizer, generation_config.json).

    ``family``: the conversion-table family the result must resolve to. Returns what the stamp records.
    """
    import transformers

    from checkpoints_convert.convert import load_arch

    model, tokenizer = _load_gguf(gguf)
    fresh = _unquantised_copy(model)
    del model
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    _, arch = load_arch(out)
    if arch.family != family:
        raise ConvertError(f"{gguf.name} converted to family '{arch.family}', the registry expects '{family}'")
    return {"family": arch.family, "params": sum(p.numel() for p in fresh.parameters()),
            "transformers": transformers.__version__}
