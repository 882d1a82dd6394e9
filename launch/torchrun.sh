#!/bin/bash
# MEML-GRPO on one machine: one process per GPU (or NPROC processes on CPU).
#
#   launch/torchrun.sh train recipes/<recipe>.yaml [key=value ...]
#
# Environment: NPROC (default: the GPU count, 1 without GPUs), DRY_RUN=1 prints the command.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: launch/torchrun.sh {sft|train|eval} RECIPE [key=value ...]" >&2
  exit 2
fi
# shellcheck source=launch/render.sh
source "$(dirname "${BASH_SOURCE[0]}")/render.sh"

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONUNBUFFERED=1
meml_torchrun 1 "${NPROC:-$(meml_gpus_per_node)}" standalone "" "$@" checkpoint.resume=auto
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  meml_print_cmd "${MEML_TORCHRUN[@]}"
  exit 0
fi
exec "${MEML_TORCHRUN[@]}"
