#!/usr/bin/env bash
# Multi-node `jaxdiff train` under SLURM: one task per node, all of the node's GPUs per task. jax auto-detects
# SLURM (coordinator = first node, process id = SLURM_PROCID), so the command only needs --distributed.
#
#   sbatch --nodes=4 launch/slurm.sh --config configs/train/sd15.py --workdir /shared/runs/sd15 \
#       --config.model.pretrained=/shared/sd15/unet --config.data.global_batch_size=256
#
# Not runnable on this machine. WORKDIR must be on a filesystem all nodes share (checkpoints are written by
# every process, each its own shards). `--signal=TERM@120` asks SLURM for SIGTERM two minutes before the time
# limit or a preemption: JAX's preemption service agrees on a step, the trainer saves it and exits 0;
# `--requeue` then restarts the job, which resumes from that checkpoint.
#SBATCH --job-name=jaxdiff-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=jaxdiff-train-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-python}
srun --kill-on-bad-exit=1 "$PYTHON" -m jaxdiff train --distributed "$@"
