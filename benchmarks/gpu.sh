#!/usr/bin/env bash
# The GPU figures in one run (a lent GPU's time is short): SD 1.5-sized random weights at 512x512, nsync-jax in
# bfloat16 against diffusers in float16, on the same GPU in the same run.
#   1. bench_sampling.py: UNet forward, 50 PNDM steps with guidance at batch 8, and a 16-image negative set;
#   2. bench_train.py: the fused NSYNC step (2 triples), three separate passes, Textual Inversion at 3x the
#      batch, and the released PyTorch algorithm.
# The pipeline is built once and shared. Logs, machine facts and the history files the scripts appended to
# (benchmarks/history/<date>-<script>.md) go to $OUT (./gpu-out when OUT is unset); the table in
# benchmarks/RESULTS.md is updated by hand from them.
#
#   bash benchmarks/gpu.sh            # from the repository root, with nsync_jax and diffusers importable
#   BENCH_PRESET=small BENCH_RESOLUTION=64 bash benchmarks/gpu.sh    # a dry run of the script on a CPU
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
# JAX and torch share the GPU within each script: JAX takes half of its memory, not the default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
preset=${BENCH_PRESET:-sd15} resolution=${BENCH_RESOLUTION:-512}
model=${TMPDIR:-/tmp}/nsync-bench-$preset
deadline=$((SECONDS + ${GPU_BUDGET_S:-570}))

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc
  python3 -c 'import jax, flax, torch, diffusers, transformers; print("jax", jax.__version__, jax.devices(),
"flax", flax.__version__, "torch", torch.__version__, "diffusers", diffusers.__version__,
"transformers", transformers.__version__)'; } 2>&1 | tee "$out/machine.txt"

timeout $((deadline - SECONDS - 240)) python3 benchmarks/bench_sampling.py --preset "$preset" --resolution "$resolution" \
  --batch 8 --steps 50 --repeats 2 --set-size 16 --dtype bfloat16 --model-dir "$model" 2>&1 | tee "$out/sampling.log"
timeout $((deadline - SECONDS)) python3 benchmarks/bench_train.py --preset "$preset" --resolution "$resolution" --batch 2 \
  --dtype bfloat16 --skip-dreamartist --steps 5 --repeats 3 --model-dir "$model" 2>&1 | tee "$out/train.log"
# the history files appended since machine.txt was written, i.e. by this run
find benchmarks/history -name '*.md' -newer "$out/machine.txt" -exec cp {} "$out/" \;
