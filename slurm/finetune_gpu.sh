#!/usr/bin/env bash
# slurm/finetune.sh with defaults for GPU nodes: one GPU per node unless --gpus-per-node says more,
# and for each GPU 8 CPUs (the loader workers decode JPEGs: below 4 cores per GPU they cannot keep
# it busy) and 64 GB of memory. sbatch options override each of these:
#   sbatch --nodes=4 --gpus-per-node=8 slurm/finetune_gpu.sh --data /shared/DATA
#   sbatch --gpus-per-node=4 --cpus-per-gpu=16 --mem-per-gpu=120G slurm/finetune_gpu.sh --data /shared/DATA
# The other #SBATCH lines repeat slurm/finetune.sh's: sbatch reads only the submitted script's.
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-gpu=8
#SBATCH --mem-per-gpu=64G
#SBATCH --job-name=finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: $0 is an sbatch script (SLURM_JOB_ID is not set); submit it: sbatch [options] $0 $*" >&2
  exit 2
fi
exec bash "${FINETUNE_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/finetune.sh" "$@"
