#!/usr/bin/env bash
# Run `jaxdiff train` on every worker of a Cloud TPU VM slice (one process per host; JAX finds the TPU topology
# and the coordinator itself: `jaxdiff train --distributed` calls jax.distributed.initialize() with no arguments).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config configs/train/sd15.py --workdir /mnt/shared/runs/sd15 --config.model.pretrained=/mnt/shared/sd15/unet
#
# Requirements (not runnable on this machine):
#   * the repository checked out at $REPO (default ~/jaxdiff) on every worker, with `pip install -e ".[tpu]"`;
#   * WORKDIR on storage every host sees (a gcsfuse-mounted bucket or NFS): orbax writes each host's shards of
#     the checkpoint there and every host reads it back on resume; process 0 writes metrics.jsonl/TensorBoard;
#   * the same command on all workers (--worker=all); a preempted slice gets SIGTERM on every host, JAX's
#     preemption service agrees on a step, the trainer saves it, and re-running this script resumes.
# Environment: TPU_NAME, ZONE (required), PROJECT (optional), REPO (default ~/jaxdiff), PYTHON (default python3).
#
# Check the plan before renting the slice (any host with libtpu, no TPU: tools/aot_compile.py). Proven there for
# SD1.5 at 512², bf16, AdamW + EMA, splash attention, on v5e-16 (v5e:4x4):
#   python tools/aot_compile.py --topology v5e:4x4 --model sd15 --mesh fsdp=16 --batch 64 --res 512 --dtype bf16
#   -> 7.15 of 16 GiB per chip (0.82 args, 6.03 temporaries), roofline 155 ms/step (HBM-bound), ~412 img/s;
#   (that compile takes 22-26 min on a 2-core host; `--opt-level O0` gives an estimate in ~5 min: 6.67 GiB, peak
#   HBM 7-8 % below the default level's, so keep 10 % of the chip spare when checking a plan that way)
# the matching training flags:
#   --config.mesh.data=1 --config.mesh.fsdp=16 --config.data.global_batch_size=64 --config.model.compute_dtype=bfloat16
# Larger slices, from docs/tpu_plans.md (O0 estimates, `python tools/tpu_plans.py`; the best fitting plan of each):
#   SD1.5 512² on v5p-64 (v5p:4x4x4): --config.mesh.fsdp=64 --config.data.global_batch_size=512
#     --config.train.remat=blocks -> 9.55 of 95 GiB per chip, roofline 46 ms/step, ~11k img/s
#   SD1.5 512² on v6e-256 (v6e:16x16): --config.mesh.fsdp=256 --config.data.global_batch_size=2048
#     --config.train.remat=blocks -> 10.05 of 32 GiB per chip, roofline 76 ms/step, ~27k img/s
#   SDXL 1024² on v6e-256: --config.mesh.fsdp=256 --config.data.global_batch_size=256 --config.train.remat=none
#     -> 25.87 of 32 GiB per chip, roofline 50 ms/step, ~5.2k img/s
# SDXL: the AOT tool scans its 2- and 10-deep transformer stacks by default; train with the same program:
#   --config.model.scan_layers=true
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-'~/jaxdiff'}
PYTHON=${PYTHON:-python3}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "cd $REPO && $PYTHON -m jaxdiff train --distributed$args"
