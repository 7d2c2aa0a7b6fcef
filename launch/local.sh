#!/usr/bin/env bash
# Runs one nsync-jax command as N processes on this machine, each with M simulated CPU devices: a multi-host
# run without a cluster (for tests, and for trying multi-host behaviour before paying for a pod).
#
#   launch/local.sh N M nsync-jax train --config configs/tiny.py --workdir /tmp/run ...
#
# Process i gets --coordinator, --num-processes N and --process-id i; its output goes to stdout prefixed with
# [i]. If one process fails, the others are stopped and the script exits with that process's status.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes=$1 devices=$2
shift 2
port=${NSYNC_JAX_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
    "$@" --coordinator "127.0.0.1:$port" --num-processes "$num_processes" --process-id "$i" \
    > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

status=0
for ((done = 0; done < num_processes; done++)); do
  # The first process to exit decides: a failure stops the rest at once.
  wait -n "${pids[@]}" || { status=$?; break; }
done
exit $status
