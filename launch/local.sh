#!/usr/bin/env bash
# Runs N moejax processes on this machine as one multi-host job (CPU, gloo collectives).
#
#   launch/local.sh N [moejax.main flags...]
#   launch/local.sh 2 --config=experiments/switch_small.py --workdir=runs/two_hosts
#
# Each process gets MOEJAX_LOCAL_DEVICES / N simulated CPU devices (default 8 / N), so together
# they form one global mesh of MOEJAX_LOCAL_DEVICES devices: the way to exercise multi-host
# training, data sharding by process and cross-process all-to-alls without a pod.
# Process 0 prints to this terminal; process i>0 writes to $MOEJAX_LOG_DIR/process_i.log
# (default runs/local_logs). The script exits with the first non-zero status of any process;
# SIGINT/SIGTERM are forwarded to all processes (they checkpoint and stop).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [moejax.main flags...]   (N: number of processes, a positive integer)" >&2
  exit 2
fi
num_processes=$1
shift
total_devices=${MOEJAX_LOCAL_DEVICES:-8}
if (( total_devices % num_processes != 0 )); then
  echo "$0: MOEJAX_LOCAL_DEVICES=$total_devices is not divisible by N=$num_processes" >&2
  exit 2
fi
devices_per_process=$(( total_devices / num_processes ))
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x "$python" ]] || python=python3
log_dir=${MOEJAX_LOG_DIR:-runs/local_logs}
mkdir -p "$log_dir"
port=${MOEJAX_PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
# shellcheck disable=SC2317,SC2329  # invoked from the traps below
forward() { for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for (( i = 0; i < num_processes; i++ )); do
  env_vars=(
    "JAX_PLATFORMS=cpu"
    "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process"
    "MOEJAX_COORDINATOR=127.0.0.1:$port"
    "MOEJAX_NUM_PROCESSES=$num_processes"
    "MOEJAX_PROCESS_ID=$i"
  )
  if (( i == 0 )); then
    env "${env_vars[@]}" "$python" -m moejax.main "$@" &
  else
    env "${env_vars[@]}" "$python" -m moejax.main "$@" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
for (( i = 0; i < num_processes; i++ )); do
  code=0
  wait "${pids[$i]}" || code=$?
  if (( code != 0 )); then
    echo "launch/local.sh: process $i exited with status $code" >&2
    (( status == 0 )) && status=$code
  fi
done
exit "$status"
