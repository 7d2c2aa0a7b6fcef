"""What a toy-world model's VAE keeps, and how hard its latents are to diffuse.

  python benchmarks/toyworld_vae.py [--model nsync_jax/toyworld/assets/sd-toyworld] [--count 256]

For fresh seen-style scenes (`world.sample_scenes(7, count)`): the judge's scores on the renders and on their VAE
round trips (a UNet drawing perfect latents could do no better than the round trip), per style too; the same
round trips for held-out-style scenes (`world.sample_scenes(8, count, world.HELD_OUT_STYLES)`); and the
latents' smoothness: the share of their spatial power above 0.3 cycles per latent pixel and the correlation of
horizontally neighbouring latents, overall and for `flat` scenes (whose images are nearly all low frequency).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from nsync_jax import imageio
from nsync_jax.models.vae import load_vae
from nsync_jax.toyworld import judge as judge_lib
from nsync_jax.toyworld import pretrain, world
from nsync_jax.toyworld.demo import BUNDLED_JUDGE


def smoothness(latents: np.ndarray) -> dict[str, float]:
    """High-frequency power share and neighbour correlation of `(N, h, w, c)` latents (per-image mean removed)."""
    x = latents - latents.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2).mean(axis=(0, 3))
    frequency = np.fft.fftfreq(x.shape[1])
    radius = np.hypot(frequency[:, None], frequency[None, :])
    correlation = np.corrcoef(x[:, :, 1:].ravel(), x[:, :, :-1].ravel())[0, 1]
    return {"high_frequency_share": round(float(power[radius >= 0.3].sum() / power.sum()), 3),
            "neighbour_correlation": round(float(correlation), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=pretrain.BUNDLED_MODEL)
    parser.add_argument("--count", type=int, default=256)
    args = parser.parse_args()
    vae = load_vae(args.model / "vae")
    graphdef, state = nnx.split(vae)

    @jax.jit
    def round_trip(state, images):
        model = nnx.merge(graphdef, state)
        latents = model.encode(images)[0]
        return latents, model.decode(latents)

    def judged_round_trips(scenes):
        """The judge's scores on the renders and on their round trips, per style too, and the latents."""
        rendered = world.render_batch(scenes)
        latents, decoded = [], []
        for i in range(0, len(scenes), 64):
            z, images = round_trip(state, pretrain.to_signed(rendered[i:i + 64]))
            latents.append(np.asarray(z))
            decoded.append(imageio.to_uint8(np.clip(np.asarray(images) / 2 + 0.5, 0, 1)))
        decoded = np.concatenate(decoded)
        styles = np.array([s.style for s in scenes])
        by_style = {style: round(judge_lib.judge_scores(judge, decoded[styles == style],
                                                        [s for s in scenes if s.style == style])["style"], 3)
                    for style in world.ALL_STYLES if (styles == style).any()}
        scores = {"rendered": judge_lib.judge_scores(judge, rendered, scenes),
                  "round_trip": judge_lib.judge_scores(judge, decoded, scenes)}
        return scores, by_style, np.concatenate(latents), styles

    judge = judge_lib.load_judge(BUNDLED_JUDGE)
    seen, seen_by_style, latents, styles = judged_round_trips(
        world.sample_scenes(7, args.count, styles=world.SEEN_STYLES))
    # The held-out styles are what the demo and the benchmark learn: a method cannot beat their round trip either.
    held_out, held_out_by_style, _, _ = judged_round_trips(
        world.sample_scenes(8, args.count, styles=world.HELD_OUT_STYLES))
    report = {
        "model": str(args.model), "count": args.count, **seen,
        "round_trip_style_by_style": seen_by_style,
        "held_out_round_trip": held_out["round_trip"],
        "held_out_round_trip_style_by_style": held_out_by_style,
        "latents": smoothness(latents),
        "latents_flat": smoothness(latents[styles == "flat"]),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
