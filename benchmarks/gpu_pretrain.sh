#!/usr/bin/env bash
# The toy world's base model on a lent GPU, in one call: `nsync-jax toyworld pretrain`'s UNet stage (its default
# recipe, or $STEPS UNet steps) on the bundled VAE, then `nsync-jax toyworld evaluate` on the result. The run
# gets SIGTERM when $GPU_BUDGET_S is nearly spent: it checkpoints and stops, and this script copies the
# checkpoints to $OUT; put them back at $RUN.checkpoints (carry it) and run the script again to go on.
# pretrain.json in the model folder records the seconds it took and the devices.
#
#   bash benchmarks/gpu_pretrain.sh       # from the repository root, with nsync_jax and ml_collections importable
#   STEPS=100 GPU_BUDGET_S=600 bash benchmarks/gpu_pretrain.sh     # a dry run on a CPU
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
run=${RUN:-.runs/gpu-pretrain}
deadline=$((SECONDS + ${GPU_BUDGET_S:-570}))

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null; nproc
  python3 -c 'import jax, flax, optax; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__,
"optax", optax.__version__)'; } 2>&1 | tee "$out/machine.txt"

# Leave 120 s for the evaluation (200 captions, 25 DDIM steps) and the copies.
timeout -s TERM $((deadline - SECONDS - 120)) python3 -m nsync_jax.cli toyworld pretrain --output "$run" \
  --config.vae_from=nsync_jax/toyworld/assets/sd-toyworld ${STEPS:+--config.unet.steps=$STEPS} \
  --checkpoint-every 1000 2>&1 \
  | tr '\r' '\n' | grep -v -E 'step/s|s/step|\?step' > "$out/pretrain.log"
tail -3 "$out/pretrain.log"
if [[ -f "$run/pretrain.json" ]]; then
  cp -r "$run" "$out/model"
  timeout $((deadline - SECONDS)) python3 -m nsync_jax.cli toyworld evaluate --model "$run" \
    > "$out/evaluate.json" 2> "$out/evaluate.log"
  cat "$out/evaluate.json"
elif [[ -d "$run.checkpoints" ]]; then
  cp -r "$run.checkpoints" "$out/checkpoints"
  echo "stopped before the end: carry $run.checkpoints (from $out/checkpoints) and run again"
else
  echo "pretraining failed: see $out/pretrain.log" >&2
  exit 1
fi
