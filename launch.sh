#!/usr/bin/env bash
# fedclip-lightning launcher: the one way to start a run, locally or on SLURM.
#
#   ./launch.sh [key=value ...]          every visible GPU of this machine (one process per GPU),
#                                        or one CPU process when there is none
#   sbatch launch.sh [key=value ...]     a SLURM job: one process per task, on every node
#
# SLURM defaults below: 1 node, 1 task (= 1 GPU) per node, 8 CPUs per task, 24 hours,
# requeue on preemption. Change them on the sbatch command line, which wins over the
# header, e.g. 2 nodes x 4 GPUs on partition gpu for 2 days:
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --partition=gpu --time=2-00:00:00 \
#       launch.sh experiment=pacs_paper data.root=/data/PACS
# On a cluster without GPUs: sbatch --gpus-per-node=0 --ntasks-per-node=2 launch.sh fabric=cpu ...
#
# Under SLURM, Fabric's num_nodes and devices come from SLURM's own variables, so they
# always match the allocation; every task writes to outputs/<...>-slurm<job id> (the
# same after a requeue), and resume=auto continues from the newest checkpoint there.
# SLURM sends USR1 90 s before the time limit (or on preemption): the run finishes its
# round, writes a checkpoint, requeues the job and exits; the requeued job resumes.
#
#SBATCH --job-name=fedclip
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# Under sbatch this file runs from SLURM's spool: find the checkout from the submit directory.
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/launch.sh" ]; then
  here="$SLURM_SUBMIT_DIR"
else
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fi

if command -v fedclip-lightning >/dev/null 2>&1; then
  cmd=(fedclip-lightning)
else
  cmd=(python3 -m fedclip_lightning)
  export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
fi

gpus_visible() {
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "-1" ]; then
    echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . ; return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l || echo 0
  else
    echo 0
  fi
}

user_fabric=0
if printf '%s\n' "$@" | grep -q '^fabric[.=]'; then user_fabric=1; fi

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
  # The batch step: start one process per task with srun. num_nodes and devices come from
  # SLURM's variables (tasks per node = processes per node); the run resumes by itself.
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  per_node="${SLURM_NTASKS_PER_NODE:-${SLURM_NTASKS:-1}}"
  per_node="${per_node%%(*}"  # SLURM may write e.g. 2(x3)
  accel=(fabric=cpu)
  if [ "$(gpus_visible)" -gt 0 ]; then accel=(fabric=gpu); fi
  if [ "$user_fabric" = 1 ]; then accel=(); fi
  echo "launch.sh: SLURM job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $per_node task(s)" >&2
  exec srun --kill-on-bad-exit=1 "${cmd[@]}" "${accel[@]}" "fabric.num_nodes=$nodes" "fabric.devices=$per_node" \
    resume=auto "$@"
fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
  # Already inside an srun step (e.g. `srun launch.sh ...`): one task, as SLURM placed it.
  exec "${cmd[@]}" "$@"
fi

# Local: every visible GPU, else the CPU.
fabric=()
if [ "$user_fabric" = 0 ]; then
  gpus=$(gpus_visible)
  if [ "$gpus" -gt 0 ]; then
    fabric=(fabric=gpu "fabric.devices=$gpus")
    echo "launch.sh: $gpus GPU(s) visible: one process per GPU" >&2
  else
    fabric=(fabric=cpu)
    echo "launch.sh: no GPU visible: one CPU process" >&2
  fi
fi
exec "${cmd[@]}" "${fabric[@]}" "$@"
