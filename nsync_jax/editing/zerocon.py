"""The passes of pix2pix-zero and pix2pix-zeroCon, and SDEdit, as pure functions of the UNet (for `jax.jit`).

From the inverted noise z_T of an image, two DDIM trajectories run side by side:

- the reference pass denoises with the caption's embedding c. It reconstructs the image, and at each step
  records the cross-attention probabilities of every cross-attention layer and, for L_cut, the outputs of the
  self-attention layers of the up blocks (`Recording`);
- the edit pass denoises with c + delta (the editing direction). At each step it takes one gradient step on its
  latents of xa_weight L_xa + cut_weight L_cut against the reference's records of that step
  (`guidance_step`), then a DDIM step with classifier-free guidance, the caption as the negative prompt.

`edit_trajectories` runs both in one `lax.scan`, recomputing the reference step next to each edit step so
that nothing is stored; `reference_step` and `edit_step` also run one at a time, for a caller that keeps the
reference records elsewhere between the two passes. `sdedit` is the usual baseline: the image latents noised
to a strength, then denoised with guidance.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax import schedulers
from nsync_jax.editing.losses import cross_attention_loss, cut_loss
from nsync_jax.models.attention import Attention
from nsync_jax.models.unet import UNet2DConditionModel


class Recording(NamedTuple):
    """What one recorded UNet call hands back."""

    prediction: jax.Array  # the model output, float32 `(batch, h, w, c)`
    probs: list[jax.Array]  # per cross-attention layer, UNet order: `(batch, heads, positions, tokens)`
    features: list[jax.Array]  # per up-block self-attention layer (if recorded): `(batch, height, width, channels)`


@dataclasses.dataclass(frozen=True)
class CutSettings:
    """PatchNCE as CUT and CDS use it: 256 positions, patch sizes 1 and 2, temperature 0.07."""

    patch_sizes: tuple[int, ...] = (1, 2)
    num_patches: int = 256
    temperature: float = 0.07


class GuidanceWeights(NamedTuple):
    cross_attention: jax.Array  # step size on L_xa (pix2pix-zero's xa_guidance)
    contrastive: jax.Array  # step size on L_cut
    classifier_free: jax.Array  # the guidance scale of the DDIM step


# ------------------------------------------------------------------------------------------------------------
# Recording the UNet's attention.
# ------------------------------------------------------------------------------------------------------------

def _is_cross_attention(path: tuple, module) -> bool:
    return isinstance(module, Attention) and path[-1] == "attn2"


def _is_up_block_self_attention(path: tuple, module) -> bool:
    return isinstance(module, Attention) and path[-1] == "attn1" and path[0] == "up_blocks"


def recording_graphdef(unet: UNet2DConditionModel, *, features: bool) -> nnx.GraphDef:
    """The graph of `unet` with every cross-attention layer recording its probabilities and, with `features`,
    every up-block self-attention layer its output; it merges with `nnx.split(unet)`'s state. `unet` itself
    is left as it was (the flags are static, so they live in the graph, not in the weights)."""
    layers = [m for path, m in nnx.iter_modules(unet) if isinstance(m, Attention)]
    saved = [(layer.record_probs, layer.record_output) for layer in layers]
    try:
        for path, module in nnx.iter_modules(unet):
            if _is_cross_attention(path, module):
                module.record_probs = True
            if features and _is_up_block_self_attention(path, module):
                module.record_output = True
        graphdef, _ = nnx.split(unet)
    finally:
        for layer, (probs, output) in zip(layers, saved):
            layer.record_probs, layer.record_output = probs, output
    return graphdef


def spatial_shape(length: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The `(height, width)` of the UNet level with `length` positions, for latents of `latent_size`.

    Each level halves the previous one, rounding up (stride-2 convolutions with padding 1)."""
    height, width = latent_size
    while height * width > length and height > 1:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != length:
        raise ValueError(f"no UNet level of {latent_size} latents has {length} positions")
    return height, width


def recorded_forward(unet: UNet2DConditionModel, latents: jax.Array, timestep, context: jax.Array) -> Recording:
    """Calls a UNet merged from `recording_graphdef` and collects what its layers recorded, in UNet order
    (down blocks, mid block, up blocks). Differentiable in `latents`."""
    compute_dtype = unet.conv_in.kernel[...].dtype
    # Capturing sets attributes on the modules, which NNX allows only at the trace level they were made at: a
    # copy made here works inside `lax.scan` and `jax.grad` too (the weights are shared, not copied).
    unet = nnx.merge(*nnx.split(unet))
    prediction, records = nnx.capture(unet, nnx.Intermediate)(latents.astype(compute_dtype), timestep,
                                                              context.astype(compute_dtype))
    probs, features = [], []
    for path, variable in nnx.to_flat_state(records):
        (value,) = variable.get_value()  # each layer runs once per call
        if path[-1] == "attention_probs":
            probs.append(value)
        else:
            height, width = spatial_shape(value.shape[1], latents.shape[1:3])
            features.append(value.reshape(value.shape[0], height, width, value.shape[-1]))
    return Recording(prediction.astype(jnp.float32), probs, features)


def word_attention_map(probs: Sequence[jax.Array], token_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Where the image attends to the tokens of `token_mask` `(batch, tokens)`: per layer the probability mass
    on them averaged over heads, resized (bilinear) to `size`, then averaged over layers; `(batch, *size)`."""
    maps = []
    for layer_probs in probs:
        mass = jnp.einsum("bhqt,bt->bq", layer_probs.astype(jnp.float32), token_mask.astype(jnp.float32))
        spatial = (mass / layer_probs.shape[1]).reshape(-1, *spatial_shape(layer_probs.shape[2], size))
        maps.append(jax.image.resize(spatial, (spatial.shape[0], *size), "linear"))
    return sum(maps) / len(maps)


# ------------------------------------------------------------------------------------------------------------
# Steps.
# ------------------------------------------------------------------------------------------------------------

def _timestep(sampler: schedulers.DDIMSampler, index) -> jax.Array:
    return jnp.asarray(sampler.timesteps)[index]


def reference_step(recording_unet: UNet2DConditionModel, sampler: schedulers.DDIMSampler, latents: jax.Array,
                   index, caption_context: jax.Array) -> tuple[jax.Array, Recording]:
    """One unguided DDIM step of the reconstruction, and what the edit step at `index` compares against."""
    recording = recorded_forward(recording_unet, latents, _timestep(sampler, index), caption_context)
    latents, _ = sampler.step((), recording.prediction, index, latents)
    return latents, recording


def guidance_step(recording_unet: UNet2DConditionModel, latents: jax.Array, timestep, edit_context: jax.Array,
                  reference: Recording, keys: jax.Array, weights: GuidanceWeights, cut: CutSettings | None):
    """One gradient step on `latents` of weights.cross_attention L_xa + weights.contrastive L_cut (L_cut only
    with `cut`) against the `reference` records of the same step.

    Returns the new latents, the losses before the step (`(batch,)` each; L_cut zero without `cut`) and the
    edit's cross-attention probabilities.
    """
    def objective(latents):
        recording = recorded_forward(recording_unet, latents, timestep, edit_context)
        cross_attention = cross_attention_loss(recording.probs, reference.probs)
        if cut is None:
            contrastive = jnp.zeros_like(cross_attention)
        else:
            contrastive = cut_loss(recording.features, reference.features, keys, patch_sizes=cut.patch_sizes,
                                   num_patches=cut.num_patches, temperature=cut.temperature)
        total = weights.cross_attention * cross_attention + weights.contrastive * contrastive
        return total.sum(), (cross_attention, contrastive, recording.probs)

    gradient, (cross_attention, contrastive, probs) = jax.grad(objective, has_aux=True)(latents)
    return latents - gradient, (cross_attention, contrastive), probs


def guided_ddim_step(unet: UNet2DConditionModel, sampler: schedulers.DDIMSampler, latents: jax.Array, index,
                     negative_context: jax.Array, context: jax.Array, guidance) -> jax.Array:
    """A DDIM step with classifier-free guidance, `negative_context` as the negative prompt.

    The two branches run one after the other (`lax.map`: one compiled UNet call) at the reference pass's
    batch size, rather than as one call on both halves: XLA may round differently at another batch size, and
    an edit with a zero direction and zero weights must reproduce the reconstruction exactly.
    """
    compute_dtype = unet.conv_in.kernel[...].dtype
    timestep = _timestep(sampler, index)
    predict = lambda c: unet(latents.astype(compute_dtype), timestep, c.astype(compute_dtype)).astype(jnp.float32)
    negative, positive = jax.lax.map(predict, jnp.stack([negative_context, context]))
    prediction = negative + guidance * (positive - negative)
    latents, _ = sampler.step((), prediction, index, latents)
    return latents


def edit_step(unet: UNet2DConditionModel, recording_unet: UNet2DConditionModel, sampler: schedulers.DDIMSampler,
              latents: jax.Array, index, caption_context: jax.Array, edit_context: jax.Array, reference: Recording,
              keys: jax.Array, weights: GuidanceWeights, cut: CutSettings | None):
    """The edit pass's step `index`: `guidance_step`, then the guided DDIM step. `keys` `(batch,)` draw the
    PatchNCE positions of this step. Returns `(latents, (L_xa, L_cut), edit probabilities)`."""
    latents, losses, probs = guidance_step(recording_unet, latents, _timestep(sampler, index), edit_context,
                                           reference, keys, weights, cut)
    latents = guided_ddim_step(unet, sampler, latents, index, caption_context, edit_context,
                               weights.classifier_free)
    return latents, losses, probs


def step_keys(keys: jax.Array, index) -> jax.Array:
    """Each image's key of step `index`."""
    return jax.vmap(lambda key: jax.random.fold_in(key, index))(keys)


def edit_trajectories(unet: UNet2DConditionModel, recording_unet: UNet2DConditionModel,
                      sampler: schedulers.DDIMSampler, noise: jax.Array, caption_context: jax.Array,
                      edit_context: jax.Array, keys: jax.Array, weights: GuidanceWeights, cut: CutSettings | None,
                      reference_tokens: jax.Array, edit_tokens: jax.Array):
    """The reference and the edit pass from `noise`, in one scan over the steps.

    Returns the reconstructed and the edited latents, the losses `(steps, 2, batch)` and the word attention
    maps of both passes averaged over the steps `(2, batch, h, w)` (`word_attention_map` of
    `reference_tokens` and `edit_tokens`).
    """
    size = noise.shape[1:3]

    def step(carry, index):
        reference_latents, latents = carry
        reference_latents, reference = reference_step(recording_unet, sampler, reference_latents, index,
                                                      caption_context)
        latents, losses, probs = edit_step(unet, recording_unet, sampler, latents, index, caption_context,
                                           edit_context, reference, step_keys(keys, index), weights, cut)
        maps = jnp.stack([word_attention_map(reference.probs, reference_tokens, size),
                          word_attention_map(probs, edit_tokens, size)])
        return (reference_latents, latents), (jnp.stack(losses), maps)

    noise = noise.astype(jnp.float32)
    (reconstruction, edited), (losses, maps) = jax.lax.scan(step, (noise, noise),
                                                            jnp.arange(len(sampler.timesteps)))
    return reconstruction, edited, losses, maps.mean(axis=0)


def sdedit(unet: UNet2DConditionModel, sampler: schedulers.DDIMSampler, alphas_cumprod, latents: jax.Array,
           noise: jax.Array, start: int, negative_context: jax.Array, context: jax.Array, guidance) -> jax.Array:
    """SDEdit: `latents` noised to the level of the sampler's step `start`, then denoised from there with
    guidance (diffusers' img2img with strength 1 - start / steps)."""
    timesteps = jnp.full((latents.shape[0],), sampler.timesteps[start])
    noisy = schedulers.add_noise(alphas_cumprod, latents.astype(jnp.float32), noise, timesteps)

    def step(latents, index):
        return guided_ddim_step(unet, sampler, latents, index, negative_context, context, guidance), None

    edited, _ = jax.lax.scan(step, noisy, jnp.arange(start, len(sampler.timesteps)))
    return edited
