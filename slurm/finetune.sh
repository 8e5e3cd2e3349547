#!/usr/bin/env bash
# Fine-tune on one or many SLURM nodes. Arguments after the script go to train.py:
#   sbatch [sbatch options] slurm/finetune.sh --data /shared/DATA --model resnet18 --epochs 5
#   FINETUNE_SCRIPT=study.py sbatch slurm/finetune.sh --data /shared/DATA    # compare strategies
#   sbatch --nodes=2 --cpus-per-task=32 slurm/finetune.sh --data /shared/DATA           # CPU nodes
#   sbatch --nodes=4 --gpus-per-node=8 slurm/finetune_gpu.sh --data /shared/DATA        # GPU nodes
# One srun task per node runs `accelerate launch` with that node's rank, on all the CPUs the job
# has there. GPUs per node come from what SLURM granted; CPU-only nodes run NPROC_PER_NODE processes
# (default 1) on gloo. GPU jobs need CPUs to decode images (4 or more cores per GPU; the job warns
# below that): slurm/finetune_gpu.sh asks for 8 CPUs and 64 GB per GPU by default, or pass
# --cpus-per-gpu/--mem-per-gpu here. This script sets no CPU or memory default itself, since sbatch
# refuses --cpus-per-task next to --cpus-per-gpu, and --mem-per-gpu without GPUs.
# Preemption and time limits: SLURM sends USR1 two minutes before the end; the script passes it
# to the run, which saves its state and stops, then requeues the job, which resumes.
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
# sbatch runs a copy of this script from the spool folder: find the project from where it was submitted.
PROJECT=${FINETUNE_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$PROJECT"
[ -f train.py ] || { echo "error: no train.py in $PROJECT (submit from the project folder or set FINETUNE_HOME)" >&2; exit 2; }
# What each process runs: train.py, or study.py (every strategy in turn, each resumable alike).
SCRIPT=${FINETUNE_SCRIPT:-train.py}
case "$SCRIPT" in
  train.py|study.py) ;;
  *) echo "error: FINETUNE_SCRIPT must be train.py or study.py, got '$SCRIPT'" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# The rendezvous: the first node of the allocation, a port derived from the job id.
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Node names need not resolve (emulated nodes, some clusters): ask SLURM for its address.
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))

# Processes per node: one per granted GPU, else NPROC_PER_NODE (default 1) CPU processes. Each
# node works out its own count below; accelerate launch needs the same count on every node.
GPUS=${SLURM_GPUS_ON_NODE:-0}
if [ "$GPUS" -gt 0 ] 2>/dev/null; then
  NPROC=${NPROC_PER_NODE:-$GPUS}
else
  GPUS=0
  NPROC=${NPROC_PER_NODE:-1}
  export ACCELERATE_USE_CPU=1  # train.py gives each process its share of the cores SLURM bound the task to
fi
WORLD=$((NPROC * SLURM_NNODES))
# srun gives a step one CPU per task unless told: the fewest CPUs any node of the job has.
CPUS=$(tr ',' '\n' <<<"${SLURM_JOB_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}" | sed 's/(.*//' | sort -n | head -n 1)
if [ "$GPUS" -gt 0 ] && [ $((CPUS / NPROC)) -lt 4 ]; then
  echo "warning: $CPUS CPUs per node for $NPROC GPU process(es): fewer than 4 cores each, the loader will" \
       "not keep the GPUs busy; ask for more with sbatch --cpus-per-gpu=8 (or use slurm/finetune_gpu.sh)" >&2
fi

# The run folder is train.py's to decide: --output-dir (a flag, or in --config) if given, else
# runs/MODEL-DATA-JOBID, the same folder across requeues.

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $NPROC process(es), main $MASTER_ADDR:$MASTER_PORT"

# USR1 = the time limit or a preemption is near. Tell the run to save and stop: srun forwards the
# signal to each node's launcher, which forwards it to its processes (torch's launcher handles
# USR1 only when asked, below); they save a state at their next step and exit. Once they have, the
# job requeues itself and starts again below, with --resume.
PREEMPTED=0
stop_and_requeue() {
  PREEMPTED=1
  if [ -n "${SRUN_PID:-}" ]; then
    echo "job $SLURM_JOB_ID: got USR1, asking the run to save and stop"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
  fi
}
trap stop_and_requeue USR1
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
# How long the launcher waits for its processes to save before it kills them (SLURM's warning is 120 s).
export PET_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}

export MASTER_ADDR MASTER_PORT NPROC WORLD PYTHON SCRIPT
if [ "$PREEMPTED" = 1 ]; then  # USR1 before the run started: nothing to save
  echo "job $SLURM_JOB_ID: got USR1 before starting, requeueing"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
# launch/multi_node.yaml is the template; each node fills in its rank and the rendezvous. Single quotes: each task expands its own SLURM_NODEID (else every node would claim rank 0).
# --kill-on-bad-exit: a crash on one node ends the others at once instead of leaving them
# waiting in a collective until the time limit.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="$SLURM_NNODES" --cpus-per-task="$CPUS" bash -c '
  local_gpus=${SLURM_GPUS_ON_NODE:-0}
  local_nproc=${NPROC_PER_NODE:-$([ "$local_gpus" -gt 0 ] 2>/dev/null && echo "$local_gpus" || echo 1)}
  mem=${SLURM_MEM_PER_NODE:-$(( ${SLURM_MEM_PER_GPU:-0} * local_gpus ))}
  echo "node $SLURM_NODEID ($(hostname -s)): ${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE} CPUs, $local_gpus GPU(s), $mem MB; starting $local_nproc process(es)"
  if [ "$local_nproc" != "$NPROC" ]; then
    echo "error: node $SLURM_NODEID has $local_gpus GPU(s) for $local_nproc process(es), the first node $NPROC: ask every node for the same count (sbatch --gpus-per-node)" >&2
    exit 2
  fi
  exec "$PYTHON" -m finetune.commands.launch --config_file launch/multi_node.yaml \
    --num_machines "$SLURM_NNODES" --num_processes "$WORLD" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    "$SCRIPT" --resume "$@"' finetune "$@" &
SRUN_PID=$!
# wait returns early when a trapped signal arrives: wait again until srun has really finished.
status=0
while :; do
  wait "$SRUN_PID" && status=0 || status=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [ "$PREEMPTED" = 1 ]; then
  echo "job $SLURM_JOB_ID: the run has stopped (status $status), requeueing"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
