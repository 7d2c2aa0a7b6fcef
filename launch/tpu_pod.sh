#!/usr/bin/env bash
# Runs one nsync-jax command on every host of a Cloud TPU pod slice (v4, v5e, v5p, v6e), the JAX way: the
# same program on every worker; jax.distributed.initialize() finds the other workers by itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE nsync-jax train --config configs/nsync_sd15_monet.py --workdir /mnt/shared/run
#
# Unless INSTALL=0, it first copies this checkout to every worker and installs it with JAX's TPU build
# (the same jax version as requirements.txt). The workdir, model and data must be readable by every worker
# at the same path (a shared filesystem such as Filestore or a gcsfuse mount).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND [ARGS...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
jax_version=$(sed -n 's/^jax==//p' "$repo/requirements.txt")
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"; }

if [[ ${INSTALL:-1} != 0 ]]; then
  tar -C "$repo" --exclude=.venv --exclude=.git -czf /tmp/nsync-jax.tgz .
  gcloud compute tpus tpu-vm scp /tmp/nsync-jax.tgz "$tpu":/tmp/ --zone "$zone" --worker=all
  ssh_all "set -e; mkdir -p ~/nsync-jax && tar -C ~/nsync-jax -xzf /tmp/nsync-jax.tgz && cd ~/nsync-jax \
    && python3 -m venv .venv && .venv/bin/python -m pip install -q -r requirements.txt -e . \
    && .venv/bin/python -m pip install -q 'jax[tpu]==$jax_version'"
fi
ssh_all "set -e; cd ~/nsync-jax && PATH=\$PWD/.venv/bin:\$PATH $(printf '%q ' "$@")"
