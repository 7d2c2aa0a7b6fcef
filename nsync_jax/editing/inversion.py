"""DDIM inversion of image latents to noise, with pix2pix-zero's noise regularisation.

The inverse steps are `schedulers.DDIMInverseSampler` (diffusers' `DDIMInverseScheduler`): DDIM sampling from
the inverted noise reconstructs the image up to the model's error.

pix2pix-zero pushes each predicted noise towards white noise before using it (`regularize_noise`): a few
gradient steps on the model output against the auto-correlation of the noise it implies (at random shifts,
over a pyramid of resolutions) and its KL divergence from N(0, 1).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from nsync_jax.schedulers import DDIMInverseSampler
from nsync_jax.models.unet import UNet2DConditionModel


# ------------------------------------------------------------------------------------------------------------
# Noise regularisation (pix2pix-zero).
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NoiseRegularization:
    """pix2pix-zero's defaults: 5 iterations of (5 auto-correlation steps of weight 20/5, one KL step of 20)."""

    auto_correlation_weight: float = 20.0
    kl_weight: float = 20.0
    iterations: int = 5
    rolls: int = 5


def _halve(noise_map: jax.Array) -> jax.Array:
    """2x2 average pooling of an `(H, W)` map (an odd last row or column is dropped, as torch's avg_pool2d)."""
    height, width = noise_map.shape[0] // 2, noise_map.shape[1] // 2
    return noise_map[:2 * height, :2 * width].reshape(height, 2, width, 2).mean(axis=(1, 3))


def auto_correlation_loss(noise: jax.Array, key: jax.Array) -> jax.Array:
    """Sum over channels and pyramid levels (halved until at most 8 rows) of the squared mean of
    noise x noise rolled by a random shift in [1, rows/2), along rows and along columns; one image `(H, W, C)`.

    White noise has no correlation at any shift, so the loss pulls the noise towards it. (The released code
    draws the shift from [0, rows/2): a zero shift penalises the variance itself.)
    """

    def channel_loss(noise_map, channel_key):
        loss = 0.0
        level = 0
        while True:
            rows = noise_map.shape[0]
            shift = jax.random.randint(jax.random.fold_in(channel_key, level), (), 1, max(rows // 2, 2))
            loss += jnp.mean(noise_map * jnp.roll(noise_map, shift, axis=0)) ** 2
            loss += jnp.mean(noise_map * jnp.roll(noise_map, shift, axis=1)) ** 2
            if rows <= 8:
                return loss
            noise_map, level = _halve(noise_map), level + 1

    channels = noise.shape[-1]
    return jax.vmap(channel_loss, in_axes=(2, 0))(noise, jax.random.split(key, channels)).sum()


def kl_loss(noise: jax.Array) -> jax.Array:
    """KL divergence of N(mean, var) of all the values from N(0, 1), up to a factor 2 (unbiased variance,
    as torch's `var()` in the released code)."""
    variance = jnp.var(noise, ddof=1)
    return variance + jnp.mean(noise) ** 2 - 1 - jnp.log(variance + 1e-7)


def regularize_noise(model_output: jax.Array, to_epsilon: Callable[[jax.Array], jax.Array], key: jax.Array,
                     settings: NoiseRegularization) -> jax.Array:
    """pix2pix-zero's gradient steps on one image's model output `(H, W, C)` against the auto-correlation and KL
    losses of the noise `to_epsilon(model_output)` implies."""
    auto_correlation_grad = jax.grad(lambda output, k: auto_correlation_loss(to_epsilon(output), k))
    kl_grad = jax.grad(lambda output: kl_loss(to_epsilon(output)))
    roll_weight = settings.auto_correlation_weight / settings.rolls

    def iteration(i, output):
        def roll(j, output):
            return output - roll_weight * auto_correlation_grad(output, jax.random.fold_in(key, i * settings.rolls + j))

        output = jax.lax.fori_loop(0, settings.rolls, roll, output)
        return output - settings.kl_weight * kl_grad(output)

    return jax.lax.fori_loop(0, settings.iterations, iteration, model_output)


def invert(unet: UNet2DConditionModel, inversion: DDIMInverseSampler, latents: jax.Array, context: jax.Array,
           keys: jax.Array, regularization: NoiseRegularization | None) -> jax.Array:
    """DDIM-inverts scaled latents `(batch, h, w, c)` under `context` without guidance; returns the noise.

    `keys` `(batch,)`: one per image, so an image's noise does not depend on the batch it is in.
    """
    compute_dtype = unet.conv_in.kernel[...].dtype
    timesteps = jnp.asarray(inversion.timesteps)

    def step(sample, index):
        output = unet(sample.astype(compute_dtype), timesteps[index], context.astype(compute_dtype))
        output = output.astype(jnp.float32)
        if regularization is not None:
            def regularize(image_output, image_sample, key):
                to_epsilon = lambda out: inversion.epsilon(out, index, image_sample)
                return regularize_noise(image_output, to_epsilon, jax.random.fold_in(key, index), regularization)

            output = jax.vmap(regularize)(output, sample, keys)
        return inversion.step(output, index, sample), None

    noise, _ = jax.lax.scan(step, latents.astype(jnp.float32), jnp.arange(len(inversion.timesteps)))
    return noise
