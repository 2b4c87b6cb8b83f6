#!/bin/bash
# Scaling study: the per-branch job of slurm/copd_8branch.sh at 1, 2, 4 and 8 branches. Each job
# gets branches x ranks-per-branch tasks and its own run directory, SCALING_ROOT/b<N>; compare
# them afterwards with the `copd report scaling` command this prints.
#
# Run from the repository root:
#   slurm/scaling_study.sh                          # tiny model on CPU (configs/scaling_cpu.yaml)
#   slurm/scaling_study.sh schedule.cycles=4        # trailing overrides go to every job
#   COPD_CONFIG=configs/copd_8branch.yaml RANKS_PER_BRANCH=8 GPUS_PER_NODE=8 \
#     SCALING_BRANCHES="text:/shards/text image:/shards/image ..." slurm/scaling_study.sh
#
# Environment:
#   COPD_CONFIG       job config (default configs/scaling_cpu.yaml)
#   SCALING_BRANCHES  name:data pairs, the first N are used; the first is the hub
#                     (default: the 8 branches of configs/scaling_cpu.yaml)
#   SCALING_COUNTS    branch counts (default "1 2 4 8")
#   SCALING_ROOT      parent of the run directories (default runs/scaling)
#   RANKS_PER_BRANCH  TP x PP x DP of the config (default 1)
#   TASKS_PER_NODE    tasks per node (default 8)
#   GPUS_PER_NODE     GPUs to request per node (default 0: CPU)
#   SCALING_PARALLEL  1: let the jobs run at the same time (default: one after another)
#   SCALING_GPU       hardware the step model predicts on: cpu (default when GPUS_PER_NODE is
#                     0: this machine, measured by a last job) or h100 | h200 | a100
#   SCALING_ASSUME    extra options for the prediction, e.g. "--interconnect-gbps 200
#                     --step-assume train_mfu=0.45"
#   Partition, account, ...: sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT, ... variables.
set -euo pipefail

# After the study, one more job writes SCALING_ROOT/predicted_vs_measured.md: the step-time
# model (copd report scaling --predict) beside each run's measured phase means.

export COPD_CONFIG=${COPD_CONFIG:-configs/scaling_cpu.yaml}
read -r -a BRANCHES <<<"${SCALING_BRANCHES:-text:arith image:reverse video:sort chart:arith \
geometry:reverse code:sort science:arith ocr:reverse}"
ROOT=${SCALING_ROOT:-runs/scaling}
RANKS=${RANKS_PER_BRANCH:-1}
PER_NODE=${TASKS_PER_NODE:-8}

prev=""
all_jobs=""
runs=()
for n in ${SCALING_COUNTS:-1 2 4 8}; do
  if ((n > ${#BRANCHES[@]})); then
    echo "SCALING_COUNTS asks for $n branches but SCALING_BRANCHES has ${#BRANCHES[@]}; add name:data pairs" >&2
    exit 1
  fi
  spec=""
  for b in "${BRANCHES[@]:0:n}"; do spec+="${spec:+, }{name: ${b%%:*}, data: ${b#*:}}"; done
  # One branch has no peer to learn from (copd needs two): its point runs the same steps as
  # GRPO alone (expert mode), so it measures a branch without exchange, scoring or merging.
  solo=()
  ((n > 1)) || solo=(schedule.mode=expert)
  world=$((n * RANKS))
  run="$ROOT/b$n"
  # Slurm does not create the directory of --output.
  mkdir -p "$run"
  # One after another by default: jobs sharing nodes or cores would skew each other's timings.
  job=$(COPD_RUN_DIR="$run" sbatch --parsable --job-name="copd-scaling-b$n" \
    --nodes=$(((world + PER_NODE - 1) / PER_NODE)) --ntasks="$world" \
    --ntasks-per-node=$((world < PER_NODE ? world : PER_NODE)) \
    --gpus-per-node="${GPUS_PER_NODE:-0}" --output="$run/slurm-%j.out" \
    ${prev:+--dependency=afterany:$prev} \
    slurm/copd_8branch.sh "branches=[$spec]" "teaching.hub=${BRANCHES[0]%%:*}" \
    "${solo[@]}" "$@")
  job=${job%%;*} # --parsable prints id;cluster on multi-cluster set-ups
  echo "b$n: job $job, $n branches x $RANKS ranks, output $run/slurm-$job.out"
  [[ "${SCALING_PARALLEL:-0}" == 1 ]] || prev=$job
  all_jobs="${all_jobs:+$all_jobs }$job"
  runs+=("$run")
done

PYTHON=${COPD_PYTHON:-python}
GPU=${SCALING_GPU:-$([[ "${GPUS_PER_NODE:-0}" == 0 ]] && echo cpu || echo h100)}
costs=""
bench=""
if [[ $GPU == cpu ]]; then # the CPU's fixed costs, measured on the node of the last job
  costs="--cpu-costs $ROOT/cpu_costs.json"
  bench="$PYTHON bench/bench_step_costs.py --config $COPD_CONFIG --out $ROOT/cpu_costs.json && "
fi
predict=$(sbatch --parsable --job-name=copd-scaling-predict --nodes=1 --ntasks=1 \
  --output="$ROOT/predict-%j.out" --dependency=afterany:"${all_jobs// /:}" \
  --wrap "${bench}$PYTHON -m copd_mega.cli report scaling --predict --gpu $GPU $costs \
${SCALING_ASSUME:-} ${runs[*]} --table $ROOT/predicted_vs_measured.md")
echo "predicted vs measured: job ${predict%%;*}, table $ROOT/predicted_vs_measured.md"

echo
echo "When the jobs have finished (squeue shows none of them):"
echo "  copd report scaling ${runs[*]}"
