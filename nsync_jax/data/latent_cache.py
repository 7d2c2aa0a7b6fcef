"""VAE posteriors computed once per image: training reads cached moments and samples a latent each step.

Encoding costs about as much as the UNet's forward pass at 512 px (1.25 TFLOP per image for SD's encoder), so
every training loop here (the trainer's methods and the toy world's pretraining) encodes its images once and
draws `sample_posterior(mean, logvar, key)` from the cache at each step.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def posterior_moments(vae, images: np.ndarray, batch_size: int = 8,
                      to_pixels: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
    """Posterior moments `(N, h, w, 2c)` (mean, then log-variance, on the last axis) of `images` `(N, H, W, 3)`,
    float32. `to_pixels` turns a slice of `images` into the VAE's input in [-1, 1] (for pools kept as uint8)."""
    graphdef, state = nnx.split(vae)
    encode = jax.jit(lambda state, x: jnp.concatenate(nnx.merge(graphdef, state).encode(x), axis=-1))
    dtype = vae.encoder.conv_in.kernel[...].dtype
    return np.concatenate([np.asarray(encode(state, jnp.asarray(to_pixels(images[i:i + batch_size]), dtype)),
                                      np.float32) for i in range(0, len(images), batch_size)])


def sampled_once(moments: np.ndarray, seed: int) -> np.ndarray:
    """One posterior draw per cached posterior, kept for the whole run (the released DreamArtist caches one
    latent per image), as moments `(..., 2c)` whose log-variance is -inf: `sample_posterior` then returns the
    draw itself at every step."""
    mean, logvar = np.split(moments, 2, axis=-1)
    noise = np.random.default_rng(seed).standard_normal(mean.shape).astype(np.float32)
    draw = mean + np.exp(0.5 * logvar) * noise
    return np.concatenate([draw, np.full_like(logvar, -np.inf)], axis=-1)


def mirrored_moments(vae, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Posterior moments `(N, 2, h, w, 2c)` of each image and its horizontal mirror image."""
    both = np.stack([images, images[:, :, ::-1]], axis=1)
    moments = posterior_moments(vae, both.reshape(-1, *images.shape[1:]), batch_size)
    return moments.reshape(len(images), 2, *moments.shape[1:])
