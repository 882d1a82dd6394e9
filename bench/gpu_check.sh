#!/usr/bin/env bash
# The GPU check, for a GPU machine without this project installed: installs the carried wheels, runs the `gpu` tests,
# then bench/train_throughput.py at the Qwen2.5-1.5B and 0.5B shapes; finishes within 8 minutes (BUDGET_S).
# Results land in $OUT: env.txt, nvidia-smi.txt, gpu_tests.log, throughput.log, throughput.json.
#
# The machine (Python 3.12, torch 2.11+cu130, transformers 5.17) has no megatron-core, Transformer Engine, apex or
# vLLM. megatron-core travels as a cp312 wheel in .whl/ (git-ignored). Fetch it once, from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl megatron-core==0.19.2
# (its requirements, numpy, packaging and torch, are already on the machine). Then run, through the device tool:
#   command "bash bench/gpu_check.sh", carry [".whl"], kind nvidia-h200 (the 1.5B local-spec baseline (b) may not
#   fit an H100's 78 GiB), timeout_s 560.
# Off the lent machine (no $OUT) results go to ./gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT"
start=$SECONDS

if ! ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
  echo "bench/gpu_check.sh: no megatron-core wheel in .whl/; fetch it with the pip download command at the top of" \
       "this script and carry .whl" | tee "$OUT/env.txt"
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 - >"$OUT/env.txt" 2>&1 <<'EOF'
import sys, torch, transformers, megatron.core
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| megatron-core", megatron.core.__version__)
print("device", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
      "| memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
import importlib.util as u
print("transformer_engine", u.find_spec("transformer_engine") is not None, "| apex", u.find_spec("apex") is not None)
EOF
cat "$OUT/env.txt"

echo "== gpu tests ($((SECONDS - start)) s)"
timeout 200 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

left=$((BUDGET_S - (SECONDS - start)))
echo "== throughput benchmark (${left} s left)"
timeout $((left + 15)) python3 bench/train_throughput.py --shapes qwen2.5-1.5b,qwen2.5-0.5b --variants a,c,b,ah,c16 \
  --seq 2048 --micro-batch 4 --micro-batches 2 --steps 5 --warmup 3 --threads 4 --budget-s "$left" \
  --child-timeout-s 150 --out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
bench_rc=${PIPESTATUS[0]}

echo "== done in $((SECONDS - start)) s: gpu tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
