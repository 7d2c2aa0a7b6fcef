#!/usr/bin/env bash
# One machine with several GPUs: a single process drives all of them (JAX sees every local GPU), so no
# launcher is needed; this script only checks what JAX sees and runs the command.
#
#   launch/multi_gpu.sh nsync-jax train --config configs/nsync_sd15_monet.py --workdir runs/monet
#
# The batch is split over all GPUs (config.mesh.data=-1 by default); add --config.mesh.fsdp=K to also split
# the frozen weights over K GPUs (--config.mesh.shard_frozen_weights=True). CUDA_VISIBLE_DEVICES picks GPUs.
# Install once: pip install -r requirements.txt -e . && pip install "jax[cuda12]==0.10.2" (the jax of requirements.txt).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
python3 - <<'PY'
import jax
gpus = [d for d in jax.devices() if d.platform == "gpu"]
if not gpus:
    raise SystemExit("launch/multi_gpu.sh: JAX sees no GPU (install jax[cuda12] and check nvidia-smi)")
print(f"launch/multi_gpu.sh: {len(gpus)} GPU(s): {', '.join(d.device_kind for d in gpus)}")
PY
exec "$@"
