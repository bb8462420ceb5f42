#!/usr/bin/env bash
# Start N local processes of `jaxdiff train`, joined by jax.distributed over 127.0.0.1 (gloo CPU collectives).
#
#   CPU_DEVICES=2 launch/local.sh N --config configs/train/unet_tiny.py --workdir runs/tiny [--config.KEY=VALUE]
#   launch/local.sh N --exec python my_script.py ...     (any command, same environment)
#
# Each process i gets JAXDIFF_COORDINATOR=127.0.0.1:$PORT, JAXDIFF_NUM_PROCESSES=N, JAXDIFF_PROCESS_ID=i, which
# `jaxdiff train` passes to jax.distributed.initialize(coordinator_address=..., num_processes=N, process_id=i)
# (scripts call jaxdiff.train.loop.initialize_distributed_from_env()).
# Environment: PORT (default: a free port), CPU_DEVICES=k (k virtual CPU devices per process, JAX_PLATFORMS=cpu),
# LOG_DIR (write process_<i>.log there instead of sharing this terminal), PYTHON (default: python).
# If one process fails the others are stopped; the exit status is the first failure's.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  sed -n '2,14p' "$0"; exit 2
fi
N=$1; shift
PYTHON=${PYTHON:-python}
if [[ "${1:-}" == "--exec" ]]; then
  shift
  command=("$@")
else
  command=("$PYTHON" -m jaxdiff train "$@")
fi
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [[ -n "${CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi

pids=()
# SIGTERM first (a jax.distributed process may take it as a preemption notice), SIGKILL what is left after 10 s.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 20); do
    alive=0
    for p in "${pids[@]}"; do if kill -0 "$p" 2>/dev/null; then alive=1; fi; done
    if ((alive == 0)); then return; fi
    sleep 0.5
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  if [[ -n "${LOG_DIR:-}" ]]; then
    mkdir -p "$LOG_DIR"
    out="$LOG_DIR/process_$i.log"
  else
    out=/dev/stdout
  fi
  JAXDIFF_COORDINATOR="127.0.0.1:$PORT" JAXDIFF_NUM_PROCESSES="$N" JAXDIFF_PROCESS_ID="$i" \
    "${command[@]}" >"$out" 2>&1 &
  pids+=($!)
done

status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  finished=""
  if wait -n -p finished "${remaining[@]}"; then rc=0; else rc=$?; fi
  next=()
  for p in "${remaining[@]}"; do
    if [[ "$p" != "$finished" ]]; then next+=("$p"); fi
  done
  remaining=("${next[@]}")
  if ((rc != 0)); then
    status=$rc
    echo "launch/local.sh: process $finished failed (exit $status); stopping the others" >&2
    cleanup
    wait || true
    break
  fi
done
exit "$status"
