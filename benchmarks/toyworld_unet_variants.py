"""Equal-budget comparison of toy-world UNet training settings, on the bundled VAE (pretraining stage 3 only).

Each variant trains the text encoder and UNet from scratch with `pretrain.train_denoiser` on the same encoded
pool, then is measured by
  - held-out v-prediction error at fixed timesteps (fixed scenes, noise and captions): how good a denoiser it is;
  - the judge on samples (DDIM 25, guidance 5) of 96 seen-style captions: style, shape set, colour set;
  - shape top-1 on 48 one-shape flat captions: the judge's most likely shape is the asked one, a softer signal
    than exact shape sets, which stay at chance early in training.
Variants are given as dotted overrides of `pretrain.default_config()`; pick `unet.steps` so that each runs for
about the same time (step times are in RESULTS.md). `--measure DIR` measures an existing model folder as it is.
Results go to OUTPUT/variants.jsonl and stdout.

  python benchmarks/toyworld_unet_variants.py --output /tmp/variants \
      --variant "lr3e-3:unet.learning_rate=3e-3,unet.steps=1300" \
      --variant "plain-v:unet.learning_rate=3e-3,unet.steps=1300,unet.snr_gamma=0"
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from nsync_jax import imageio, sampling, tokens  # noqa: E402
from nsync_jax.config import apply_override  # noqa: E402
from nsync_jax.pipeline import load_pipeline  # noqa: E402
from nsync_jax.schedulers import NoiseSchedule, add_noise, training_target  # noqa: E402
from nsync_jax.models.vae import load_vae  # noqa: E402
from nsync_jax.toyworld import judge as judge_lib  # noqa: E402
from nsync_jax.toyworld import pretrain, world  # noqa: E402
from nsync_jax.toyworld.demo import BUNDLED_JUDGE  # noqa: E402

HELD_OUT_TIMESTEPS = (200, 500, 800, 950)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """"NAME:key=value,key=value" -> (NAME, ["key=value", ...]), overrides in `--config.` form."""
    name, _, overrides = text.partition(":")
    return name, [item for item in overrides.split(",") if item]


def encoded_pool(config, vae_folder: Path, cache: Path):
    """(latents, caption ids, scaling factor) of the pretraining pool, cached: they do not depend on the variant."""
    if cache.exists():
        data = np.load(cache)
        return data["latents"], data["ids"], float(data["scaling_factor"])
    vae = load_vae(vae_folder / "vae")
    pretrain.make_deterministic(vae)
    scenes = world.sample_scenes(config.seed, config.pool_size, styles=world.SEEN_STYLES)
    latents = np.split(pretrain.encode_pool(vae, world.render_batch(scenes, size=config.resolution)), 2, -1)[0]
    ids = pretrain.caption_variants(tokens.load_tokenizer(vae_folder / "tokenizer"), scenes)
    scaling_factor = float(1.0 / latents.std())
    np.savez(cache, latents=latents, ids=ids, scaling_factor=scaling_factor)
    return latents, ids, scaling_factor


def held_out_v_error(pipe) -> dict[int, float]:
    """Mean squared v-prediction error on fixed held-out scenes, noise and (style-naming) captions."""
    schedule = NoiseSchedule.from_config(pipe.scheduler_config)
    scenes = world.sample_scenes(9, 256, styles=world.SEEN_STYLES)
    vae_graph, vae_state = nnx.split(pipe.vae)
    encode = jax.jit(lambda state, x: nnx.merge(vae_graph, state).encode(x)[0])
    latents = encode(vae_state, pretrain.to_signed(world.render_batch(scenes))) * pipe.vae.config.scaling_factor
    context = pipe.text_encoder(jnp.asarray(tokens.tokenize(pipe.tokenizer, [world.caption(s) for s in scenes])))
    noise = jax.random.normal(jax.random.key(1), latents.shape)
    errors = {}
    for step in HELD_OUT_TIMESTEPS:
        t = jnp.full((latents.shape[0],), step)
        prediction = pipe.unet(add_noise(schedule.alphas_cumprod, latents, noise, t), t, context)
        errors[step] = round(float(jnp.mean(jnp.square(prediction - training_target(schedule, latents, noise, t)))), 4)
    return errors


def measure(folder: Path, judge) -> dict:
    pipe = load_pipeline(folder)
    settings = sampling.SampleSettings(scheduler="ddim", steps=25, guidance=5.0, batch_size=16)

    def draw(scenes):
        return imageio.to_uint8(sampling.generate(pipe, [world.caption(s) for s in scenes], seed=0,
                                                  settings=settings, progress=False))

    mixed = world.sample_scenes(5, 96, styles=world.SEEN_STYLES)
    one_shape = world.sample_scenes(6, 48, styles=("flat",), max_shapes=1)
    shape_logits = judge_lib.logits(judge, draw(one_shape))["shape"]
    top1 = np.mean([world.SHAPES[int(np.argmax(row))] == scene.shapes[0]
                    for row, scene in zip(shape_logits, one_shape)])
    return {"held_out_v_mse": held_out_v_error(pipe),
            "judge_96": {k: round(v, 3) for k, v in judge_lib.judge_scores(judge, draw(mixed), mixed).items()},
            "one_shape_top1": round(float(top1), 3)}


def train_variant(name: str, overrides: list[str], vae_from: Path, output: Path) -> tuple[Path, float]:
    """Trains stage 3 with the overrides on `vae_from`'s VAE; returns the model folder and training seconds."""
    config = pretrain.default_config()
    for override in overrides:
        apply_override(config, override)
    latents, ids, scaling_factor = encoded_pool(config, vae_from, output / "pool.npz")
    configs = pretrain.folder_configs(config)
    configs["vae"]["scaling_factor"] = scaling_factor
    modules = pretrain.build_modules(configs, config.seed)
    started = time.perf_counter()
    text_encoder, unet = pretrain.train_denoiser(modules["text_encoder"], modules["unet"], latents, ids,
                                                 scaling_factor, NoiseSchedule.from_config(configs["scheduler"]),
                                                 config, log=lambda row: None)
    seconds = round(time.perf_counter() - started, 1)
    vae = load_vae(vae_from / "vae")
    pretrain.make_deterministic(vae)
    folder = pretrain.write_model_folder(output / name, configs,
                                         {"vae": vae, "text_encoder": text_encoder, "unet": unet},
                                         vae_from / "tokenizer", {})
    return folder, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value")
    parser.add_argument("--measure", action="append", type=Path, default=[],
                        help="a model folder to measure as it is (no training)")
    parser.add_argument("--vae-from", type=Path, default=pretrain.BUNDLED_MODEL)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    judge = judge_lib.load_judge(BUNDLED_JUDGE)

    def report(name, overrides, folder, seconds):
        row = {"variant": name, "overrides": overrides, "train_seconds": seconds, **measure(folder, judge)}
        print(json.dumps(row), flush=True)
        with (args.output / "variants.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    for folder in args.measure:
        report(str(folder), [], folder, None)
    for name, overrides in map(parse_variant, args.variant):
        report(name, overrides, *train_variant(name, overrides, args.vae_from, args.output))

if __name__ == "__main__":
    main()
