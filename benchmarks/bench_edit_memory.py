"""Device memory of zero-shot editing at SD 1.5 sizes: what XLA's buffer assignment plans for each compiled
program of `nsync-jax edit`, on abstract weights (nothing is allocated, nothing is downloaded).

Programs, for `--batch` images of `--resolution` px: the DDIM inversion with noise regularisation; both passes
in one scan with the reference recomputed (`--reference recompute`, the default); one edit step fed with a
stored reference (`--reference host`). "weights" are the UNet's arguments, "temporaries" the largest live set
XLA plans besides them. On CPU the plan follows XLA's CPU backend (bfloat16 is computed through float32 there);
run it on the accelerator to plan for that one. Appends a table to benchmarks/history/ unless `--no-write`.

  python benchmarks/bench_edit_memory.py --resolution 512 --batch 1 --dtype float32
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from results_file import publish  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_sd15_sizes import SD15_UNET  # noqa: E402  the real SD 1.5 UNet configuration

from nsync_jax import schedulers  # noqa: E402
from nsync_jax.editing import zerocon  # noqa: E402
from nsync_jax.editing.inversion import NoiseRegularization, invert  # noqa: E402
from nsync_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

SD15_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      clip_sample=False)


def plan(fn, *args) -> tuple[float, float, float]:
    """(compile seconds, argument GiB, temporary GiB) of `jax.jit(fn)` for abstract `args`."""
    start = time.perf_counter()
    memory = jax.jit(fn).lower(*args).compile().memory_analysis()
    return time.perf_counter() - start, memory.argument_size_in_bytes / 2**30, memory.temp_size_in_bytes / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(dict(SD15_UNET)), dtype=dtype,
                                                       param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, weights = nnx.split(unet)
    recording = zerocon.recording_graphdef(unet, features=True)
    sampler = schedulers.DDIMSampler(SD15_SCHEDULER, args.steps)
    inversion = schedulers.DDIMInverseSampler(SD15_SCHEDULER, args.steps)
    cut = zerocon.CutSettings()
    side = args.resolution // 8
    spec = jax.ShapeDtypeStruct
    latents = spec((args.batch, side, side, 4), jnp.float32)
    context = spec((args.batch, 77, 768), jnp.float32)
    tokens = spec((args.batch, 77), jnp.bool_)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), args.batch))
    weights_of = lambda scalars: zerocon.GuidanceWeights(*scalars)
    scalars = (spec((), jnp.float32),) * 3

    def inverted(weights, latents, context, keys):
        return invert(nnx.merge(graphdef, weights), inversion, latents, context, keys, NoiseRegularization())

    def both_passes(weights, noise, caption, edit, keys, tokens, scalars):
        return zerocon.edit_trajectories(nnx.merge(graphdef, weights), nnx.merge(recording, weights), sampler, noise,
                                         caption, edit, keys, weights_of(scalars), cut, tokens, tokens)

    reference = jax.eval_shape(lambda w, x, c: zerocon.recorded_forward(nnx.merge(recording, w), x, 1, c),
                               weights, latents, context)

    def edit_step(weights, latents, caption, edit, reference, keys, scalars):
        return zerocon.edit_step(nnx.merge(graphdef, weights), nnx.merge(recording, weights), sampler, latents, 0,
                                 caption, edit, reference, keys, weights_of(scalars), cut)

    rows = []
    for name, fn, fn_args in [
        ("inversion (regularised)", inverted, (weights, latents, context, keys)),
        ("both passes, reference recomputed", both_passes, (weights, latents, context, context, keys, tokens, scalars)),
        ("edit step, reference stored", edit_step, (weights, latents, context, context, reference, keys, scalars)),
    ]:
        seconds, argument_gib, temporary_gib = plan(fn, *fn_args)
        rows.append(f"| {name} | {argument_gib:.2f} | {temporary_gib:.2f} | {argument_gib + temporary_gib:.2f} "
                    f"| {seconds:.0f} |")
        print(rows[-1], flush=True)
    records = sum(x.size for x in jax.tree.leaves((reference.probs, reference.features))) * args.steps
    report = "\n".join([
        f"\n## {datetime.date.today()} editing memory, `bench_edit_memory.py --resolution {args.resolution} "
        f"--batch {args.batch} --steps {args.steps} --dtype {args.dtype}`\n",
        f"SD 1.5 UNet, XLA {jax.default_backend()} buffer assignment ({platform.processor() or platform.machine()}). "
        f"A stored reference (`--reference host`) holds {records / 1e9:.2f} G values for the batch "
        f"({2 * records / 2**30:.1f} GiB in bfloat16) on the host.\n",
        "| program | weights GiB | temporaries GiB | total GiB | compile s |", "|---|---|---|---|---|", *rows, ""])
    publish(report, write=not args.no_write)


if __name__ == "__main__":
    main()
