#!/bin/bash
# CoPD with 8 expert branches of a ~7B vision-language model (ViT-L/14-336 tower; text, image
# and video branches): each branch is TP4 x PP1 x DP2 = 8 GPUs (one node), 64 GPUs in all. The
# vision-language model runs with PP1, so a branch's 8 GPUs are TP4 x DP2 (the config's header
# says why; a text-only run can use parallel.tp=2 parallel.pp=2). One task per GPU; copd_mega
# reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and rank 0 prints the rank layout and the
# per-GPU memory plan before any model is built.
#
# Submit from the repository root (the config and run directory are relative to it), with the
# Python environment that has copd_mega installed active (sbatch passes your environment on):
#   sbatch slurm/copd_8branch.sh                         # configs/copd_8branch.yaml as it is
#   sbatch slurm/copd_8branch.sh optim.lr=2e-6           # trailing dotted.key=value overrides
#   COPD_CONFIG=configs/x.yaml COPD_RUN_DIR=runs/x sbatch slurm/copd_8branch.sh
#   slurm/copd_8branch.sh --dry-run                      # 64-rank layout + memory plan, no GPUs
#
# Environment:
#   COPD_CONFIG   config file (default configs/copd_8branch.yaml)
#   COPD_RUN_DIR  run directory (default: run_dir in the config)
#   COPD_PYTHON   interpreter with copd_mega installed (default: python on PATH)
#   COPD_DRY_RUN  1: same as --dry-run
#   COPD_GPU_MEMORY_GB  GPU memory the dry run checks the memory plan against (default 80)
#   MASTER_PORT   rendezvous port (default derived from the job id)
#
# A resubmitted or requeued job continues from the newest complete step in RUN/checkpoints
# (--resume=auto). Checkpoints come every checkpoint.every_minutes, and the job reads its
# allocation's end from Slurm: it does not start a step it could not finish and save before
# the end (predicted from measured step and save times); it saves, and this script requeues
# it (scontrol requeue; the job keeps its id and waits in the queue again). SIGUSR1 two minutes
# before the limit (or SIGTERM) does the same at the next step boundary. A job that ended with
# an error is not requeued.
#SBATCH --job-name=copd-8branch
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=USR1@120

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

CONFIG=${COPD_CONFIG:-configs/copd_8branch.yaml}
PYTHON=${COPD_PYTHON:-python}

if [[ "${1:-}" == "--dry-run" || "${COPD_DRY_RUN:-0}" == 1 ]]; then
  [[ "${1:-}" == "--dry-run" ]] && shift
  # The allocation's task count inside Slurm; outside it, nodes x tasks per node from the header
  # above, so the check covers exactly what sbatch would start.
  nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$0")
  per_node=$(sed -n 's/^#SBATCH --ntasks-per-node=//p' "$0")
  exec "$PYTHON" -m copd_mega.cli plan --config "$CONFIG" \
    --world-size "${SLURM_NTASKS:-$((nodes * per_node))}" \
    --gpu-memory-gb "${COPD_GPU_MEMORY_GB:-80}" \
    ${COPD_RUN_DIR:+"run_dir=$COPD_RUN_DIR"} "$@"
fi
: "${SLURM_JOB_ID:?submit with sbatch, or pass --dry-run to check the layout without Slurm}"

# torch.distributed rendezvous (env://): the allocation's first node hosts the TCP store.
hosts=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
export MASTER_ADDR=${hosts[0]}
# One port per job id, so two jobs whose first node is the same do not collide.
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# Abort every rank when one fails instead of hanging until the collective timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# WARN reports NCCL set-up problems (wrong interface, no InfiniBand) without per-call noise.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Nodes with several networks: name the fast one, or NCCL may bootstrap over the slow one.
# export NCCL_SOCKET_IFNAME=ib0
# The 8 ranks of a node share its cores; torch would otherwise start one thread per core in each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Progress reaches the output file as it happens.
export PYTHONUNBUFFERED=1

# --resume=auto starts fresh when the run directory holds no complete checkpoint (it says which).
# --kill-on-bad-exit: one failed rank ends the step rather than leaving the others blocked.
# --stopped-file: global rank 0 writes it when the job stopped early with a checkpoint.
stopped="${SLURM_SUBMIT_DIR:-.}/.copd-stopped-$SLURM_JOB_ID"
rm -f "$stopped"
rc=0
srun --kill-on-bad-exit=1 "$PYTHON" -m copd_mega.cli train --config "$CONFIG" --resume=auto \
  --stopped-file "$stopped" ${COPD_RUN_DIR:+"run_dir=$COPD_RUN_DIR"} "$@" || rc=$?
if [[ $rc == 0 && -s "$stopped" ]]; then
  echo "copd_8branch.sh: requeueing job $SLURM_JOB_ID ($(cat "$stopped"))"
  rm -f "$stopped"
  scontrol requeue "$SLURM_JOB_ID"
fi
rm -f "$stopped"
exit "$rc"
