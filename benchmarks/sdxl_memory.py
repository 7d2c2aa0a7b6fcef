"""Device memory of Stable Diffusion XL: the weights of each part per dtype, and XLA's compiled plan of the NSYNC
training step (token rows of both text encoders, frozen UNet and encoders) on abstract weights: nothing is
allocated and nothing is downloaded.

(a) Parameters of each part, counted on the modules built from the folder's configs (`nnx.eval_shape`), and their
    bytes in 16-bit and float32 (arithmetic: *derived*).
(b) The jitted NSYNC step as `trainer.train` builds it with `configs/nsync_sdxl.py` (variant `released`, so three
    groups: positive, negative, anchor; both encoders' rows), weights and compute in `--dtype`, lowered for
    `jax.ShapeDtypeStruct`s at `--resolution` and compiled on one device for each of `--triples` and with and
    without `train.remat`: `compiled.memory_analysis()` (*measured*, XLA's buffer assignment of the backend that
    compiles). float32 by default: XLA's CPU backend computes bfloat16 convolutions and matmuls through float32
    and plans float32 copies of bfloat16 weights among the temporaries, so a CPU's bfloat16 plan says little
    about an accelerator's; its attention (the einsum path) keeps every attention probability, as a TPU's does
    and a GPU's cuDNN flash attention does not (docs/scaling.md derives the bfloat16 figures from these).
(c) With `--meshes`, the same step on 8 simulated CPU devices (a child process with
    `--xla_force_host_platform_device_count=8`) at one triple per device, for each `data x fsdp` mesh: frozen
    weights replicated on (8, 1), split over fsdp (`mesh.shard_frozen_weights=True`) on the others.

  python benchmarks/sdxl_memory.py --triples 1                       # SDXL base (the shipped config), 1024 px
  python benchmarks/sdxl_memory.py --meshes 8x1 2x4 1x8              # and the per-device plans of three meshes
  python benchmarks/sdxl_memory.py --model DIR --resolution 64 --no-write   # another SDXL folder's configs
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_full_finetune import GiB, per_device_bytes, split_over_fsdp  # noqa: E402
from results_file import publish  # noqa: E402  benchmarks/ is on sys.path when run as a script

from nsync_jax import distributed, weights  # noqa: E402
from nsync_jax.models.clip_text import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,  # noqa: E402
                                        CLIPTextWithProjectionConfig)
from nsync_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from nsync_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from nsync_jax.sdxl import StableDiffusionXL  # noqa: E402
from nsync_jax.train import trainables  # noqa: E402
from sdxl_models import REPO, SDXL_BASE, nsync_config, nsync_step, sdxl_trainable  # noqa: E402

PARTS = {  # folder -> (config class, module class)
    "text_encoder": (CLIPTextConfig, CLIPTextModel),
    "text_encoder_2": (CLIPTextWithProjectionConfig, CLIPTextModelWithProjection),
    "unet": (UNetConfig, UNet2DConditionModel),
    "vae": (VAEConfig, AutoencoderKL),
}


def abstract_sdxl(folder: Path, dtype) -> StableDiffusionXL:
    """An SDXL pipeline of `folder`'s configs with abstract modules (shapes only), weights and compute in `dtype`
    (as `load_pipeline(dtype=dtype)` for token training: the frozen weights in the compute dtype); no tokenizers."""
    modules = {}
    for part, (config_class, module_class) in PARTS.items():
        path = folder / part / "config.json"
        config = config_class.from_dict(weights.read_json(path), path)
        modules[part] = weights.abstract_module(
            lambda rngs, config=config, module_class=module_class: module_class(config, dtype=dtype,
                                                                                param_dtype=dtype, rngs=rngs))
    return StableDiffusionXL(folder=folder, tokenizer=None, tokenizer_2=None, **modules,
                             scheduler_config=weights.read_json(folder / "scheduler" / "scheduler_config.json"))


def parameter_counts(pipe: StableDiffusionXL) -> dict[str, int]:
    from flax import nnx

    return {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
            for name, module in pipe.modules().items()}


def nsync_step_plan(folder: Path, triples: int, remat: bool, resolution: int, dtype: str,
                    mesh_shape=None) -> dict:
    """XLA's memory plan of the NSYNC step (per device), as `trainer.train` jits it for SDXL token rows."""
    config = nsync_config(triples, resolution, dtype=dtype, remat=remat)
    method, trainable = sdxl_trainable(config)
    pipe = abstract_sdxl(folder, jnp.dtype(dtype))
    # What SDXLEmbeddings.split returns, without the tokenizers the abstract pipeline lacks: the frozen modules
    # and one (num_vectors, width) float32 block of rows per encoder.
    graphdefs, frozen = trainables.split_frozen(pipe, dict.fromkeys((*method.frozen_modules(config),
                                                                     "text_encoder_2")))
    rows = {name: jax.ShapeDtypeStruct((config.num_vectors, pipe.modules()[name].config.hidden_size), jnp.float32)
            for name in ("text_encoder", "text_encoder_2")}
    side, tokens = resolution // 8, pipe.text_encoder.config.max_position_embeddings
    latent = jax.ShapeDtypeStruct((3, triples, side, side, pipe.unet.config.in_channels), jnp.float32)
    batch = {"ids": jax.ShapeDtypeStruct((3, triples, 2, tokens), jnp.int32), "mean": latent, "logvar": latent}
    key = jax.eval_shape(lambda: jax.random.key(0))
    step, tx = nsync_step(config, graphdefs, pipe.scheduler_config, pipe.vae.config.scaling_factor)
    opt_state = jax.eval_shape(tx.init, rows)
    frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))
    if mesh_shape is None:
        jitted, arguments = jax.jit(step, donate_argnums=(0, 1)), (rows, opt_state, frozen, batch, key)
        frozen_per_device = frozen_bytes
    else:  # as trainer.train: rows and Adam state replicated, frozen weights replicated or split over fsdp
        mesh = distributed.make_mesh(*mesh_shape)
        whole, batch_sharding = distributed.replicated(mesh), distributed.batch_sharded(mesh, batch_axis=1)
        frozen_sharding = distributed.frozen_shardings(mesh, frozen, mesh_shape[1] > 1)
        rows_sharding, opt_sharding = trainable.shardings(mesh, rows), trainable.shardings(mesh, opt_state)
        jitted = jax.jit(step, in_shardings=(rows_sharding, opt_sharding, frozen_sharding, batch_sharding, whole),
                         out_shardings=(rows_sharding, opt_sharding, whole), donate_argnums=(0, 1))
        placed = lambda tree, shardings: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
        arguments = (placed(rows, rows_sharding), placed(opt_state, opt_sharding), placed(frozen, frozen_sharding),
                     placed(batch, {k: batch_sharding for k in batch}), placed(key, whole))
        frozen_per_device = per_device_bytes(frozen, frozen_sharding)
    start = time.perf_counter()
    memory = jitted.lower(*arguments).compile().memory_analysis()
    seconds = time.perf_counter() - start
    plan = dict(triples=triples, remat=remat, mesh=list(mesh_shape or (1, 1)), compile_s=seconds,
                frozen=frozen_per_device, argument=memory.argument_size_in_bytes,
                output=memory.output_size_in_bytes, alias=memory.alias_size_in_bytes,
                temp=memory.temp_size_in_bytes)
    if mesh_shape is not None:
        plan["frozen_split"] = f"{split_over_fsdp(frozen_sharding)}/{len(jax.tree.leaves(frozen))}"
    print(f"triples {triples}, remat {remat}, mesh {plan['mesh']}: compiled in {seconds:.0f} s, temporaries "
          f"{plan['temp'] / GiB:.2f} GiB", file=sys.stderr, flush=True)
    return plan


def run_mesh_child(args) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    command = [sys.executable, __file__, "--mesh-child", "--model", str(args.model), "--resolution",
               str(args.resolution), "--dtype", args.dtype, "--meshes", *args.meshes,
               *(["--mesh-remat"] if args.mesh_remat else [])]
    result = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def mesh_plans(args) -> list[dict]:
    """One triple per device on each mesh of `--meshes` (runs in the 8-device child)."""
    if jax.device_count() < 8:
        raise SystemExit("the mesh plans need 8 devices: run without --mesh-child (it sets XLA_FLAGS)")
    return [nsync_step_plan(args.model, 8, args.mesh_remat, args.resolution, args.dtype,
                            tuple(map(int, mesh.split("x"))))
            for mesh in args.meshes]


def total(plan: dict) -> int:
    """Peak bytes a device holds for the step: arguments + outputs - donated + temporaries."""
    return plan["argument"] + plan["output"] - plan["alias"] + plan["temp"]


def report(args, counts: dict[str, int], plans: list[dict], meshes: list[dict]) -> str:
    trained_parts = ("unet", "text_encoder", "text_encoder_2")
    lines = [
        f"\n## {datetime.date.today()} SDXL memory, `sdxl_memory.py {' '.join(sys.argv[1:]) or '(defaults)'}`\n",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; JAX {jax.__version__} "
        f"backend {jax.default_backend()} (XLA's buffer assignment for that backend). Configs: "
        f"{args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model}.\n",
        "Weights (parameter counts of the modules built from the configs; bytes *derived*: x 2 or x 4; "
        "GB = 1e9 bytes):\n",
        "| part | parameters | 16-bit GB | float32 GB |", "|---|---|---|---|",
        *(f"| {name} | {count / 1e6:,.1f} M | {2 * count / 1e9:.2f} | {4 * count / 1e9:.2f} |"
          for name, count in counts.items()),
    ]
    step_weights = sum(counts[name] for name in trained_parts)
    lines += [f"| UNet + both text encoders (the NSYNC step's frozen weights) | {step_weights / 1e6:,.1f} M | "
              f"{2 * step_weights / 1e9:.2f} | {4 * step_weights / 1e9:.2f} |",
              f"| full fine-tuning state of UNet + both encoders (float32 weights, gradients, Adam m and v: "
              f"16 B a parameter) | | | {16 * step_weights / 1e9:.1f} |"]
    if plans:
        lines += [
            f"\nNSYNC step (configs/nsync_sdxl.py: variant released, 3 groups; weights and compute {args.dtype}), "
            f"{args.resolution} px "
            f"(latents {args.resolution // 8}x{args.resolution // 8}), one device, *measured* (compiled plan, "
            "`memory_analysis()`):\n",
            "| triples | remat | frozen weights GiB | arguments GiB | temporaries GiB | total GiB (arguments + outputs - "
            "donated + temporaries) | compile s |", "|---|---|---|---|---|---|---|",
            *(f"| {p['triples']} | {p['remat']} | {p['frozen'] / GiB:.2f} | {p['argument'] / GiB:.2f} | "
              f"{p['temp'] / GiB:.2f} | {total(p) / GiB:.2f} | {p['compile_s']:.0f} |" for p in plans),
        ]
    if meshes:
        lines += [
            f"\nThe NSYNC step on 8 simulated devices, one triple per device (global batch 8), remat "
            f"{args.mesh_remat}, per device, *measured* (compiled plan):\n",
            "| mesh data x fsdp | frozen leaves split | frozen weights per device GiB | arguments GiB | "
            "temporaries GiB | total GiB | compile s |", "|---|---|---|---|---|---|---|",
            *(f"| {p['mesh'][0]} x {p['mesh'][1]} | {p.get('frozen_split', '0')} | {p['frozen'] / GiB:.2f} | "
              f"{p['argument'] / GiB:.2f} | {p['temp'] / GiB:.2f} | {total(p) / GiB:.2f} | {p['compile_s']:.0f} |"
              for p in meshes),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SDXL_BASE, help="a diffusers SDXL folder (configs only read)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                        help="weights and compute of the step (float32: see the docstring)")
    parser.add_argument("--triples", type=int, nargs="*", default=[1, 2], help="triples per step, one plan each")
    parser.add_argument("--remat", choices=("both", "on", "off"), default="both", help="train.remat of the plans")
    parser.add_argument("--meshes", nargs="*", default=[], metavar="DATAxFSDP",
                        help="per-device plans on 8 simulated devices, e.g. 8x1 2x4 1x8")
    parser.add_argument("--mesh-remat", action="store_true", help="train.remat for the mesh plans")
    parser.add_argument("--mesh-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    for mesh in args.meshes:
        data, _, fsdp = mesh.partition("x")
        if not (data.isdigit() and fsdp.isdigit() and int(data) * int(fsdp) == 8):
            parser.error(f"--meshes {mesh}: give DATAxFSDP with data x fsdp = 8 devices, e.g. 2x4")
    if args.mesh_child:
        print(json.dumps(mesh_plans(args)))
        return

    counts = parameter_counts(abstract_sdxl(args.model, jnp.float32))
    remats = {"both": (False, True), "on": (True,), "off": (False,)}[args.remat]
    plans = [nsync_step_plan(args.model, triples, remat, args.resolution, args.dtype)
             for triples in args.triples for remat in remats]
    meshes = run_mesh_child(args) if args.meshes else []
    publish(report(args, counts, plans, meshes), write=not args.no_write)


if __name__ == "__main__":
    main()
