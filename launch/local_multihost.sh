#!/usr/bin/env bash
# Rehearses a pod slice on one machine: N processes of cmvt_jax.main on localhost, joined by
# JAX's multi-host runtime (gloo collectives on CPU), each with DEVICES fake CPU devices.
#
#   launch/local_multihost.sh N [--config=... --workdir=... --config.KEY=VALUE ...]
#   DEVICES=2 PORT=12355 launch/local_multihost.sh 2 --config=configs/micro.py --workdir=/tmp/run
#
# PYTHON names the interpreter (default: `python`, i.e. the activated virtualenv's); set it
# when the virtualenv is not activated, e.g. PYTHON=.venv/bin/python.
#
# Every process gets the same arguments plus its --process_id. Process 0's output goes to
# this terminal; process i's to $LOG_DIR/process_i.log (default: a temporary folder). The
# script exits with the first non-zero exit code, after all processes have ended.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES [cmvt_jax.main arguments...]" >&2
  exit 2
fi
count=$1
shift
devices=${DEVICES:-1}
python=${PYTHON:-python}
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d -t cmvt_multihost.XXXXXX)}
mkdir -p "$log_dir"
cd "$(dirname "$0")/.."

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
pids=()
for ((i = 0; i < count; i++)); do
  args=(-m cmvt_jax.main --coordinator_address="127.0.0.1:${port}" --num_processes="$count"
        --process_id="$i" "$@")
  if [[ $i -eq 0 ]]; then
    "$python" "${args[@]}" &
  else
    "$python" "${args[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
# A signal to this script reaches every process (preemption rehearsals).
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT

status=0
for ((i = 0; i < count; i++)); do
  # `wait` returns early when a trapped signal arrives; wait again until the process ends.
  while true; do
    code=0
    wait "${pids[$i]}" || code=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if ((code != 0)); then
    echo "process $i exited with $code (log: $log_dir/process_$i.log)" >&2
    ((status == 0)) && status=$code
  fi
done
exit $status
