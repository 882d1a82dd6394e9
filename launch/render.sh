# shellcheck shell=bash
# Command-line builders shared by launch/slurm/meml.sbatch and launch/torchrun.sh (sourced, never run).
# Each builder fills a global array so that arguments keep their quoting; callers run "${ARRAY[@]}" or print
# it (DRY_RUN=1).

# GPUs per node: MEML_GPUS_PER_NODE, else SLURM's count, else nvidia-smi, else 1 (CPU).
meml_gpus_per_node() {
  if [[ -n "${MEML_GPUS_PER_NODE:-}" ]]; then
    echo "${MEML_GPUS_PER_NODE}"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "${SLURM_GPUS_ON_NODE}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

# meml_torchrun NNODES NPROC ENDPOINT RDZV_ID MEML_ARGS... -> MEML_TORCHRUN
# One torchrun per node; c10d rendezvous at ENDPOINT (host:port), or --standalone when ENDPOINT is "standalone".
meml_torchrun() {
  local nnodes=$1 nproc=$2 endpoint=$3 rdzv_id=$4
  shift 4
  MEML_TORCHRUN=(torchrun "--nnodes=${nnodes}" "--nproc-per-node=${nproc}")
  if [[ "${endpoint}" == standalone ]]; then
    MEML_TORCHRUN+=(--standalone)
  else
    MEML_TORCHRUN+=(--rdzv-backend=c10d "--rdzv-endpoint=${endpoint}" "--rdzv-id=${rdzv_id}")
  fi
  MEML_TORCHRUN+=(--max-restarts=0 -m megatron_meml.cli "$@")
}

# meml_srun NNODES IMAGE MOUNTS -> MEML_SRUN: one task per node, in the container when IMAGE is set (pyxis).
meml_srun() {
  local nnodes=$1 image=$2 mounts=$3
  MEML_SRUN=(srun "--nodes=${nnodes}" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
  if [[ -n "${image}" ]]; then
    MEML_SRUN+=("--container-image=${image}" "--container-workdir=${PWD}" --no-container-mount-home)
    if [[ -n "${mounts}" ]]; then
      MEML_SRUN+=("--container-mounts=${mounts}")
    fi
  fi
}

# Print an array as one shell-quoted line (what DRY_RUN=1 shows).
meml_print_cmd() {
  printf '%q ' "$@"
  printf '\n'
}
