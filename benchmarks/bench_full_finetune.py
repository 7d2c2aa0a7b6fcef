"""Full fine-tuning (UNet + text encoder trained, AdamW, float32 weights): speed against PyTorch, and device memory
with replicated against fsdp-split weights.

(a) Steps per second of nsync-jax's `trainable=full` step against a DreamBooth-style PyTorch step on diffusers
    modules (UNet2DConditionModel + CLIPTextModel loaded from the same random diffusers folder, a preset of
    `bench_sampling.py`), same batch, same examples, same machine and run. Both steps start from the cached VAE
    posteriors (the VAE is frozen and outside both steps): latent sample, noise, add_noise, text encoder, UNet,
    MSE, backward, AdamW over UNet + text encoder (torch: then zero_grad). torch uses every core, as XLA does.
(b) Device memory of the SD 1.5-sized step (UNet 320/640/1280/1280, text encoder 768 wide x 12 layers) as XLA
    plans it on abstract weights (nothing is allocated or downloaded): the jitted step with the trainer's
    shardings and donation, lowered for `jax.ShapeDtypeStruct`s and compiled for mesh data=8 x fsdp=1 (trained
    weights, gradients and Adam state replicated) and data=1 x fsdp=8 (split by `distributed.frozen_shardings`),
    at a global batch of 8 (one image per device). Meshes need 8 devices: the script runs this part in a child
    process of itself with 8 simulated CPU devices (`--xla_force_host_platform_device_count=8`), so the figures
    are XLA CPU's buffer assignment, per device.

  python benchmarks/bench_full_finetune.py --preset small --resolution 128 --batch 2 --memory-resolution 512
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_sampling import PRESETS, build_pipeline  # noqa: E402
from bench_train import median_rate  # noqa: E402
from results_file import publish  # noqa: E402  benchmarks/ is on sys.path when run as a script

from nsync_jax import distributed  # noqa: E402
from nsync_jax.data.style_dataset import StyleDataset  # noqa: E402
from nsync_jax.models.clip_text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from nsync_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from nsync_jax.pipeline import StableDiffusion, load_pipeline  # noqa: E402
from nsync_jax.schedulers import NoiseSchedule  # noqa: E402
from nsync_jax.train import methods, trainables  # noqa: E402
from nsync_jax.train.config import default_config  # noqa: E402
from nsync_jax.train.step import StepSpec, make_train_step  # noqa: E402
from nsync_jax.train.trainer import make_optimizer  # noqa: E402

MEMORY_MESHES = ((8, 1), (1, 8))  # (data, fsdp): replicated trained state, then split over fsdp
GiB = 2 ** 30


def full_config(batch: int, learning_rate: float):
    """The trainer's config for full fine-tuning of the UNet and text encoder (AdamW, no lr scaling)."""
    config = default_config()
    config.method, config.trainable, config.placeholder_token = "textual_inversion", "full", "zwx"
    config.full.train_text_encoder = True
    config.train.batch_size, config.train.learning_rate, config.train.scale_lr = batch, learning_rate, False
    return config


def full_step(config, spec: StepSpec, tx, **jit_args):
    """The jitted step of `config`'s method and trainable, as `trainer.train` builds it (`jit_args`: shardings,
    donation)."""
    gradients = methods.get(config.method).gradients(spec, config)
    return jax.jit(make_train_step(gradients, tx, norm_metric=trainables.get(config.trainable).norm_metric),
                   **jit_args)


# ------------------------------------------------------------------------------------------------------------
# (a) Steps per second against PyTorch.
# ------------------------------------------------------------------------------------------------------------

def speed_rows(args) -> list[tuple[str, float]]:
    """(step, median steps/s) of nsync-jax's full step and the PyTorch DreamBooth-style step."""
    import torch

    torch.set_num_threads(os.cpu_count())
    config = full_config(args.batch, args.learning_rate)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_pipeline(args.preset, Path(tmp))
        folder = Path(tmp) / "model"
        count, res = 8, args.resolution
        images = np.random.default_rng(0).uniform(-1, 1, (count, res, res, 3)).astype(np.float32)
        dataset = StyleDataset(stems=tuple(map(str, range(count))), positives=images, negatives=None,
                               captions=("a red star",) * count)

        # --- nsync-jax: the trainer's step, float32 master weights ------------------------------------------
        method, trainable = methods.get(config.method), trainables.get(config.trainable)
        pipe = load_pipeline(folder, param_dtype=trainable.load_dtype)  # float32 master weights
        training = method.prepare(pipe, dataset, config, Path(tmp), False)
        batches = [training.batch(i) for i in range(4)]
        graphdefs, frozen, trained = trainable.split(pipe, config, method, ("text_encoder", "unet"))
        spec = StepSpec(graphdefs, NoiseSchedule.from_config(pipe.scheduler_config),
                        pipe.vae.config.scaling_factor, jnp.float32, 0, trainable=trainable)
        scaling_factor = pipe.vae.config.scaling_factor
        tx = make_optimizer(config, method)
        step = full_step(config, spec, tx, donate_argnums=(0, 1))
        state = {"trained": trained, "opt": tx.init(trained), "i": 0}

        def jax_step():
            state["trained"], state["opt"], metrics = step(state["trained"], state["opt"], frozen,
                                                           batches[state["i"] % 4], jax.random.key(state["i"]))
            jax.block_until_ready(metrics)
            state["i"] += 1

        rows.append(("nsync-jax full step (trainable=full)", median_rate(jax_step, args.steps, args.repeats)))
        pipe = frozen = trained = state = None  # frees the JAX models before the PyTorch run

        # --- PyTorch: a DreamBooth-style step on diffusers modules ------------------------------------------
        import diffusers
        import transformers

        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").train()
        text_encoder = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").train()
        noise_scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        optimizer = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()),
                                      lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x[0].transpose(0, 3, 1, 2)))
        torch_batches = [(nchw(b["mean"]), nchw(b["logvar"]), torch.from_numpy(b["ids"][0]).long()) for b in batches]
        position = [0]

        def torch_step():
            mean, logvar, ids = torch_batches[position[0] % 4]
            latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),))
            noisy = noise_scheduler.add_noise(latents, noise, t)
            context = text_encoder(ids)[0]
            loss = torch.nn.functional.mse_loss(unet(noisy, t, context).sample, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            position[0] += 1

        rows.append(("PyTorch DreamBooth-style step (diffusers UNet + CLIPTextModel)",
                     median_rate(torch_step, args.steps, args.repeats)))
    return rows


# ------------------------------------------------------------------------------------------------------------
# (b) SD 1.5 device memory, replicated against fsdp (runs in the child process with 8 CPU devices).
# ------------------------------------------------------------------------------------------------------------

def per_device_bytes(tree, shardings) -> int:
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def split_over_fsdp(shardings) -> int:
    """How many leaves `shardings` split over the fsdp axis."""
    return sum(distributed.FSDP in str(s.spec) for s in jax.tree.leaves(shardings))


def memory_plans(resolution: int) -> list[dict]:
    """XLA's per-device memory plan of the SD 1.5 full step on each mesh of `MEMORY_MESHES`."""
    from bench_edit_memory import SD15_SCHEDULER
    from test_sd15_sizes import SD15_TEXT, SD15_UNET

    if jax.device_count() < 8:
        raise SystemExit("the memory plans need 8 devices: run without --memory-child (it sets XLA_FLAGS)")
    batch = 8  # one image per device on either mesh
    config = full_config(batch, 1e-5)
    method, trainable = methods.get(config.method), trainables.get(config.trainable)
    graphdefs = {}

    def split_sd15():
        """The trainer's split of the SD 1.5 UNet and text encoder (traced: only shapes come out)."""
        pipe = StableDiffusion(
            folder=Path(), tokenizer=None, vae=None, scheduler_config=SD15_SCHEDULER,
            text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(SD15_TEXT), rngs=nnx.Rngs(0)),
            unet=UNet2DConditionModel(UNetConfig.from_dict(dict(SD15_UNET)), rngs=nnx.Rngs(0)),
            extra_token_rows=np.zeros((0, SD15_TEXT["hidden_size"]), np.float32))
        split_graphdefs, frozen, trained = trainable.split(pipe, config, method, ("text_encoder", "unet"))
        graphdefs.update(split_graphdefs)  # static structure, not arrays: it leaves the trace as it is
        return frozen, trained

    frozen, trained = jax.eval_shape(split_sd15)
    spec = StepSpec(graphdefs, NoiseSchedule.from_config(SD15_SCHEDULER), 0.18215, jnp.float32, 0,
                    trainable=trainable)
    tx = make_optimizer(config, method)
    opt_state = jax.eval_shape(tx.init, trained)
    side = resolution // 8
    latent = jax.ShapeDtypeStruct((1, batch, side, side, 4), jnp.float32)  # (groups, batch, h, w, c)
    batch_arrays = {"ids": jax.ShapeDtypeStruct((1, batch, 77), jnp.int32), "mean": latent, "logvar": latent}
    key = jax.eval_shape(lambda: jax.random.key(0))
    with_sharding = lambda tree, shardings: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    plans = []
    for data, fsdp in MEMORY_MESHES:
        mesh = distributed.make_mesh(data, fsdp)
        whole, batch_sharding = distributed.replicated(mesh), distributed.batch_sharded(mesh, batch_axis=1)
        # As trainer.train for trainable=full: weights and Adam state split over fsdp (whole when fsdp is 1).
        trained_sharding = trainable.shardings(mesh, trained)
        opt_sharding = trainable.shardings(mesh, opt_state)
        frozen_sharding = distributed.frozen_shardings(mesh, frozen, False)
        step = full_step(config, spec, tx,
                         in_shardings=(trained_sharding, opt_sharding, frozen_sharding, batch_sharding, whole),
                         out_shardings=(trained_sharding, opt_sharding, whole), donate_argnums=(0, 1))
        start = time.perf_counter()
        compiled = step.lower(with_sharding(trained, trained_sharding), with_sharding(opt_state, opt_sharding),
                              with_sharding(frozen, frozen_sharding),
                              with_sharding(batch_arrays, {k: batch_sharding for k in batch_arrays}),
                              with_sharding(key, whole)).compile()
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        plans.append(dict(
            data=data, fsdp=fsdp, compile_s=seconds, trained_params=sum(x.size for x in jax.tree.leaves(trained)),
            trained_leaves=len(jax.tree.leaves(trained)), trained_split=split_over_fsdp(trained_sharding),
            opt_leaves=len(jax.tree.leaves(opt_state)), opt_split=split_over_fsdp(opt_sharding),
            trained_bytes=per_device_bytes(trained, trained_sharding),
            opt_bytes=per_device_bytes(opt_state, opt_sharding),
            argument=memory.argument_size_in_bytes, output=memory.output_size_in_bytes,
            alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes,
            code=memory.generated_code_size_in_bytes))
        print(f"mesh {data}x{fsdp}: compiled in {seconds:.0f} s", file=sys.stderr, flush=True)
    return plans


def run_memory_child(resolution: int) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, __file__, "--memory-child", "--memory-resolution", str(resolution)],
                            env=env, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------------------------------

def report(args, rates: list[tuple[str, float]], plans: list[dict]) -> str:
    import torch

    ours = rates[0][1]
    lines = [
        f"\n## {datetime.date.today()} full fine-tuning, `bench_full_finetune.py {' '.join(sys.argv[1:])}`\n",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU; JAX {jax.__version__} "
        f"backend {jax.default_backend()}, torch {torch.__version__} on CPU ({os.cpu_count()} threads), float32.\n",
        f"Speed: preset {args.preset}, {args.resolution}x{args.resolution}, batch {args.batch}, UNet + text encoder "
        f"trained with AdamW, both steps from cached VAE posteriors. Medians of {args.repeats} runs of "
        f"{args.steps} steps after a warm-up step.\n",
        "| step | steps/s | nsync-jax steps/s over this row |",
        "|---|---|---|",
        *(f"| {name} | {rate:.3f} | {ours / rate:.2f}x |" for name, rate in rates),
    ]
    if plans:
        first = plans[0]
        lines += [
            f"\nMemory: SD 1.5 sizes, UNet and text encoder trained ({first['trained_params'] / 1e6:.1f} M parameters "
            f"in {first['trained_leaves']} leaves), "
            f"{args.memory_resolution}x{args.memory_resolution} px (latent {args.memory_resolution // 8}), global "
            "batch 8 = 1 image per device, 8 simulated CPU devices; XLA CPU's compiled plan per device "
            "(`memory_analysis()`), abstract weights.\n",
            "| mesh data x fsdp | trained leaves split | Adam leaves split | weights + Adam state per device GiB "
            "(from shardings) | arguments GiB | outputs GiB | aliased (donated) GiB | temporaries GiB | "
            "generated code MiB | total GiB (arguments + outputs - aliased + temporaries) | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in plans:
            lines.append(
                f"| {p['data']} x {p['fsdp']} | {p['trained_split']}/{p['trained_leaves']} | "
                f"{p['opt_split']}/{p['opt_leaves']} | {(p['trained_bytes'] + p['opt_bytes']) / GiB:.2f} | "
                f"{p['argument'] / GiB:.2f} | {p['output'] / GiB:.2f} | {p['alias'] / GiB:.2f} | "
                f"{p['temp'] / GiB:.2f} | {p['code'] / 2 ** 20:.1f} | "
                f"{(p['argument'] + p['output'] - p['alias'] + p['temp']) / GiB:.2f} | {p['compile_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--memory-resolution", type=int, default=512, help="0: skip the SD 1.5 memory plans")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)  # part (b), 8 devices
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    if args.memory_child:
        print(json.dumps(memory_plans(args.memory_resolution)))
        return
    plans = run_memory_child(args.memory_resolution) if args.memory_resolution else []
    text = report(args, speed_rows(args), plans)
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
