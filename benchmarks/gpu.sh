#!/usr/bin/env bash
# The GPU figures in one run each (a lent GPU's time is short), nsync-jax in bfloat16 against diffusers in
# float16, on the same GPU in the same run.
# `sd15` (the default): SD 1.5-sized random weights at 512x512.
#   1. bench_sampling.py: UNet forward, 50 PNDM steps with guidance at batch 8, and a 16-image negative set;
#   2. bench_train.py: the fused NSYNC step (2 triples), three separate passes, Textual Inversion at 3x the
#      batch, and the released PyTorch algorithm.
# `sdxl`: SDXL base-sized random weights (the shipped architecture) at 1024x1024, sdxl_speed.py twice (one
# part a process, so that one part running out of memory leaves the other's row):
#   1. sampling, 30 Euler steps with guidance 5, batch 2, against diffusers' StableDiffusionXLPipeline (float16);
#   2. the NSYNC step, 2 triples, configs/nsync_sdxl.py (remat), against the released SDXL loop (bfloat16).
#   Each runs the PyTorch rows in a child process first and JAX after it, alone on the GPU.
# The pipeline is built once and shared. Logs, machine facts and the history files the scripts appended to
# (benchmarks/history/<date>-<script>.md) go to $OUT (./gpu-out when OUT is unset); the table in
# benchmarks/RESULTS.md is updated by hand from them.
#
#   bash benchmarks/gpu.sh [sd15|sdxl]    # from the repository root, with nsync_jax and diffusers importable
#   bash benchmarks/gpu.sh sdxl train     # one SDXL part (sampling or train) with the whole budget
#   BENCH_PRESET=small BENCH_RESOLUTION=64 bash benchmarks/gpu.sh    # a dry run of the script on a CPU
#   BENCH_PRESET=tiny BENCH_RESOLUTION=64 BENCH_SAMPLING_STEPS=2 bash benchmarks/gpu.sh sdxl   # the same, SDXL
set -uo pipefail
model_family=${1:-sd15}
case $model_family in sd15|sdxl) ;; *) echo "usage: bash benchmarks/gpu.sh [sd15|sdxl]" >&2; exit 2 ;; esac
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
# XLA's default optimisation level, in case an import of tests/conftest.py (the offline tokenizer) would set the
# tests' level 0 before JAX starts (a level set here wins there).
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=3"
# JAX and torch share the GPU within each SD 1.5 script: JAX takes half of its memory, not the default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
if [ "$model_family" = sdxl ]; then
  preset=${BENCH_PRESET:-base} resolution=${BENCH_RESOLUTION:-1024}
else
  preset=${BENCH_PRESET:-sd15} resolution=${BENCH_RESOLUTION:-512}
fi
model=${TMPDIR:-/tmp}/nsync-bench-$model_family-$preset
deadline=$((SECONDS + ${GPU_BUDGET_S:-570}))

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc
  python3 -c 'import jax, flax, torch, diffusers, transformers; print("jax", jax.__version__, jax.devices(),
"flax", flax.__version__, "torch", torch.__version__, "diffusers", diffusers.__version__,
"transformers", transformers.__version__)'; } 2>&1 | tee "$out/machine.txt"

if [ "$model_family" = sdxl ]; then
  # sdxl_speed.py runs JAX only after its PyTorch child has ended: JAX may take most of the GPU.
  sdxl="python3 benchmarks/sdxl_speed.py --preset $preset --resolution $resolution --dtype bfloat16 --repeats 2 \
    --model-dir $model"
  parts=(${2:-sampling train})
  for part in "${parts[@]}"; do
    # every part but the last leaves 300 s of the budget to those after it
    [ "$part" = "${parts[-1]}" ] && left=$((deadline - SECONDS)) || left=$((deadline - SECONDS - 300))
    case $part in
      sampling) options="--batch 2 --steps ${BENCH_SAMPLING_STEPS:-30}" ;;
      train) options="--triples 2 --train-steps 3" ;;
      *) echo "unknown SDXL part $part (sampling, train)" >&2; exit 2 ;;
    esac
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $left $sdxl --parts "$part" $options 2>&1 | tee "$out/sdxl-$part.log"
  done
  find benchmarks/history -name '*.md' -newer "$out/machine.txt" -exec cp {} "$out/" \;
  exit 0
fi
timeout $((deadline - SECONDS - 240)) python3 benchmarks/bench_sampling.py --preset "$preset" --resolution "$resolution" \
  --batch 8 --steps 50 --repeats 2 --set-size 16 --dtype bfloat16 --model-dir "$model" 2>&1 | tee "$out/sampling.log"
timeout $((deadline - SECONDS)) python3 benchmarks/bench_train.py --preset "$preset" --resolution "$resolution" --batch 2 \
  --dtype bfloat16 --skip-dreamartist --steps 5 --repeats 3 --model-dir "$model" 2>&1 | tee "$out/train.log"
# the history files appended since machine.txt was written, i.e. by this run
find benchmarks/history -name '*.md' -newer "$out/machine.txt" -exec cp {} "$out/" \;
