"""``model.dtype: auto``: bf16 on CUDA, fp32 on every CPU (with native bf16 matmuls or without)."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest

from megatron_meml.config import load_config
from megatron_meml.model.config import ModelConfig
from megatron_meml.model.dtype import auto_dtype, cpu_bf16_native, for_this_machine, resolve_model_dtype

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("cuda,native,want", [(True, False, "bf16"), (True, True, "bf16"), (False, True, "fp32"),
                                              (False, False, "fp32")])
def test_auto_resolves_by_hardware(cuda, native, want):
    assert resolve_model_dtype(ModelConfig(dtype="auto"), cuda=cuda, bf16_native=native).dtype == want


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_explicit_dtype_is_kept(dtype):
    for cuda in (True, False):
        cfg = ModelConfig(dtype=dtype, hidden_size=96)
        assert resolve_model_dtype(cfg, cuda=cuda, bf16_native=False) == cfg


def test_unknown_dtype_names_the_key():
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        ModelConfig(dtype="bfloat16")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
                    reason="reads the x86 CPU flags from /proc/cpuinfo")
def test_probe_agrees_with_the_kernels_cpu_flags():
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")).split()
    assert cpu_bf16_native() == ("avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags)


def test_the_real_model_recipes_run_the_machines_dtype():
    want, _ = auto_dtype()
    for name in ("smollm2-wordmath.yaml", "smollm2-wordmath-mef.yaml", "smollm2-wordmath-sparse.yaml",
                 "smollm2-wordmath-sparse-mef.yaml"):
        cfg = load_config(RECIPES / name)
        assert cfg.model.dtype == "auto", name
        assert for_this_machine(cfg).model.dtype == want, name


def test_auto_on_a_cpu_with_bf16_matmuls_says_why_it_runs_fp32():
    dtype, why = auto_dtype(cuda=False, bf16_native=True)
    assert dtype == "fp32" and "below bf16's resolution" in why and "model.dtype=bf16" in why
