"""The shared forward pass and the jitted training step every method and trainable runs through.

A step is one pure function `train_step(trained, opt_state, frozen, batch, key)` under `jax.jit`: the frozen
model is an argument (never a captured constant), what is trained and its optimizer state are donated, and
the step's randomness is `fold_in(key(seed), step)`. A batch holds groups `(groups, batch, ...)` (NSYNC:
positive, negative, anchor); `denoise` runs the text encoder and the UNet once over all of them, each group
reading its own copy of what is trained, so one backward pass returns every group's gradient. What a method
does with those predictions is its `gradients` function (`methods/`); what is trained and how it enters the
modules is the trainable's (`trainables/`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nsync_jax import tokens
from nsync_jax.models.vae import sample_posterior
from nsync_jax.pipeline import TextConditioner
from nsync_jax.schedulers import NoiseSchedule, add_noise, training_target
from nsync_jax.sdxl import SDXLConditioner
from nsync_jax.train import trainables

# gradients(trained, frozen, batch, key) -> (gradients, extra optimizer arguments, metrics)
Gradients = Callable[[Any, Any, dict, jax.Array], tuple[Any, dict, dict]]


# Batch entries that are the conditioner's per-image inputs `(groups, batch, ...)` (SDXL's micro-conditioning).
CONDITIONING = ("time_ids",)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the jitted step needs to know statically."""

    graphdefs: Any
    schedule: NoiseSchedule
    scaling_factor: float
    compute_dtype: Any
    clip_skip: int
    remat: bool = False
    max_timestep: int = 0  # 0: all of the schedule's timesteps
    trainable: trainables.Trainable = trainables.EMBEDDINGS  # how what is trained enters the modules
    # SDXL: the micro-conditioning of the images of a batch that carries none of its own (`batch["time_ids"]`,
    # each image's, from `data.style_batch`): the released SDXL scripts' fixed (res, res, 0, 0, res, res) for
    # squashed images; empty for SD 1.x/2.x.
    time_ids: tuple[float, ...] = ()
    # How prompts condition the UNet (`pipeline.TextConditioner`, `sdxl.SDXLConditioner`: what the model's
    # `sampling_conditioning` gives); None: SDXL's where `time_ids` is set, else SD's.
    conditioner: Any = None

    def __post_init__(self):
        if self.conditioner is None:
            conditioner = SDXLConditioner(self.clip_skip) if self.time_ids else TextConditioner(self.clip_skip)
            object.__setattr__(self, "conditioner", conditioner)


def draw_latents(spec: StepSpec, key, mean, logvar):
    """One group's training inputs from its key: a latent sample of each cached posterior `(batch, h, w, c)`
    (scaled), its noise, and timesteps `(batch,)`."""
    k_latent, k_noise, k_time = jax.random.split(key, 3)
    latents = sample_posterior(mean, logvar, k_latent) * spec.scaling_factor
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    t = jax.random.randint(k_time, (mean.shape[0],), 0, spec.max_timestep or spec.schedule.num_train_timesteps)
    return latents, noise, t


def conditioning(batch: dict) -> dict:
    """The conditioner's per-image inputs a batch carries (`CONDITIONING`)."""
    return {name: batch[name] for name in CONDITIONING if name in batch}


def denoise(spec: StepSpec, group_params, frozen, ids, mean, logvar, group_keys, shared: bool = False,
            extras: dict | None = None):
    """One denoising pass over every group of a step: text encoders and UNet each run once on all groups.

    Args:
      group_params: one copy per group of what is trained (leading axis `groups`); with `shared`, one copy for
        every group.
      ids: `(groups, batch, tokens)`, with several text encoders (SDXL) `(groups, batch, encoders, tokens)`;
        mean, logvar: `(groups, batch, h, w, c)` cached VAE posteriors.
      group_keys: `(groups,)` keys; each group's latent sample, noise and timesteps come from its own key.
      extras: the conditioner's per-image inputs `(groups, batch, ...)` (`conditioning(batch)`); SDXL's
        `time_ids` default to `spec.time_ids` for every image.
    Returns:
      The UNet's float32 predictions and their training targets `(groups, batch, h, w, c)`, the noisy latents
      `(groups, batch, h, w, c)` and the timesteps `(groups, batch)`.
    """
    trainable, conditioner = spec.trainable, spec.conditioner
    groups, batch = ids.shape[:2]
    extras = dict(extras or {})
    if spec.time_ids and "time_ids" not in extras:
        extras["time_ids"] = jnp.broadcast_to(jnp.asarray(spec.time_ids, jnp.float32),
                                              (groups, batch, len(spec.time_ids)))

    def run_unet(unet_states, x, t, context, added_cond):
        return nnx.merge(spec.graphdefs["unet"], *unet_states)(x, t, context, added_cond)

    if spec.remat:  # keep only the UNet's inputs for the backward pass and recompute the rest
        run_unet = jax.checkpoint(run_unet)

    def encoders_of(params):
        """The conditioner's text encoders with one copy of what is trained (None: the frozen ones)."""
        return {name: nnx.merge(spec.graphdefs[name], *trainable.module_states(name, params, frozen))
                for name in conditioner.encoders}

    def encoder_ids(ids):
        """Each encoder's token ids: with several encoders, one row each on the axis before the tokens."""
        return (ids,) if len(conditioner.encoders) == 1 else tuple(jnp.moveaxis(ids, -2, 0))

    def embed(params, encoders, ids):
        """Each encoder's input embeddings of its ids with one copy of what is trained: a trainable with rows per
        encoder (SDXL's) gives them by name (`encoder_rows`), any other embeds with the one encoder's table."""
        embeds = []
        for name, each in zip(conditioner.encoders, encoder_ids(ids)):
            table = encoders[name].embeddings.token_embedding.embedding[...]
            rows = trainable.encoder_rows(params, name)
            embeds.append(trainable.embed(params, table, each) if rows is None
                          else tokens.embed_tokens(table, rows.astype(table.dtype), each))
        return embeds

    def condition(encoders, embeds, ids, extras):
        """The UNet's text conditioning `(context, added_cond)`, the context in the compute dtype."""
        context, added_cond = conditioner.from_embeds(encoders, embeds, encoder_ids(ids), extras)
        return context.astype(spec.compute_dtype), added_cond

    def one_pass(params, ids, latents, noise, t, extras):
        """Text encoders and UNet on a batch `(n, ...)` with one copy of what is trained."""
        encoders = encoders_of(params)
        context, added_cond = condition(encoders, embed(params, encoders, ids), ids, extras)
        noisy = add_noise(spec.schedule.alphas_cumprod, latents, noise, t)
        prediction = run_unet(trainable.module_states("unet", params, frozen), noisy.astype(spec.compute_dtype), t,
                              context, added_cond)
        target = training_target(spec.schedule, latents, noise, t)
        return prediction.astype(jnp.float32), target, noisy

    flat = lambda x: x.reshape(groups * batch, *x.shape[2:])
    by_group = lambda x: x.reshape(groups, batch, *x.shape[1:])
    latents, noise, t = jax.vmap(functools.partial(draw_latents, spec))(group_keys, mean, logvar)
    if shared:  # one set of weights: every group runs as one batch
        prediction, target, noisy = one_pass(group_params, flat(ids), flat(latents), flat(noise), flat(t),
                                             jax.tree.map(flat, extras))
        return by_group(prediction), by_group(target), by_group(noisy), t
    if trainable.trains_modules:
        # Each group runs with its own copy of the trained weights (vmapped), so one backward pass gives every
        # group's gradient. The frozen weights are shared (not mapped).
        prediction, target, noisy = jax.vmap(one_pass)(group_params, ids, latents, noise, t, extras)
        return prediction, target, noisy, t
    # Only token rows differ between groups: each group embeds its prompts with its own copy, then every group
    # runs through the frozen text encoders and UNet as one batch.
    encoders = encoders_of(None)
    embeds = jax.vmap(lambda params, ids: embed(params, encoders, ids))(group_params, ids)
    context, added_cond = condition(encoders, [flat(e) for e in embeds], flat(ids), jax.tree.map(flat, extras))
    latents, noise, t = flat(latents), flat(noise), flat(t)
    noisy = add_noise(spec.schedule.alphas_cumprod, latents, noise, t)
    prediction = run_unet(trainable.module_states("unet", None, frozen), noisy.astype(spec.compute_dtype), t,
                          context, added_cond)
    target = training_target(spec.schedule, latents, noise, t)
    return by_group(prediction.astype(jnp.float32)), by_group(target), by_group(noisy), by_group(t)


def denoising_losses(spec: StepSpec, group_params, frozen, ids, mean, logvar, group_keys, shared: bool = False,
                     extras: dict | None = None):
    """Per-group denoising losses `(groups,)`: the mean over each group's elements (arguments as `denoise`)."""
    prediction, target, _, _ = denoise(spec, group_params, frozen, ids, mean, logvar, group_keys, shared, extras)
    return jnp.mean(jnp.square(prediction - target), axis=(2, 3, 4)).mean(axis=1)


def group_keys(key, groups: int, share_noise: bool):
    """One key per group; group 1 reuses group 0's key when the two share their noise (NSYNC's positive and
    its negative with `share_noise`; DreamArtist's two words always)."""
    ids = [0, 0 if share_noise else 1, 2][:groups] if groups > 1 else [0]
    return jnp.stack([jax.random.fold_in(key, i) for i in ids])


def group_gradients(spec: StepSpec, groups: int, share_noise: bool, params, frozen, batch, key):
    """Each group's gradient of its own denoising loss, from one pass (Textual Inversion: one group; NSYNC:
    positive, negative and, for the variants that read it, anchor). Returns (the first group's gradient, the
    others' as the optimizer's extra arguments `negative_grads`, `anchor_grads`, metrics)."""
    batch = jax.tree.map(lambda x: x[:groups], batch)  # NSYNC's batches carry an anchor group; not run when unread

    def total_loss(group_params):
        losses = denoising_losses(spec, group_params, frozen, batch["ids"], batch["mean"], batch["logvar"],
                                  group_keys(key, groups, share_noise), extras=conditioning(batch))
        return losses.sum(), losses

    group_params = jax.tree.map(lambda x: jnp.broadcast_to(x, (groups, *x.shape)), params)
    (_, losses), grads = jax.value_and_grad(total_loss, has_aux=True)(group_params)
    grads = [jax.tree.map(lambda g, i=i: g[i], grads) for i in range(groups)]
    metrics = {"loss": losses[0], "grad_norm": optax.tree.norm(grads[0])}
    if groups == 1:
        return grads[0], {}, metrics
    metrics.update(loss_negative=losses[1], negative_grad_norm=optax.tree.norm(grads[1]))
    extra = {"negative_grads": grads[1]}
    if groups == 3:
        metrics["loss_anchor"] = losses[2]
        extra["anchor_grads"] = grads[2]
    return grads[0], extra, metrics


def accumulate(gradients: Gradients, microbatches: int) -> Gradients:
    """`gradients` over `microbatches` slices of the batch (arrays `(groups, batch, ...)`), run one after the
    other under `lax.scan`: the means of all three outputs. Slice i takes every `microbatches`-th example from
    i, so each device keeps its own examples; its key is `fold_in(key, i)`."""
    if microbatches == 1:
        return gradients

    def run(params, frozen, batch, key):
        split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], -1, microbatches, *x.shape[2:]), 2, 0)
        slices = jax.tree.map(split, batch)

        def add(total, inputs):
            index, part = inputs
            return jax.tree.map(jnp.add, total, gradients(params, frozen, part, jax.random.fold_in(key, index))), None

        shapes = jax.eval_shape(gradients, params, frozen, jax.tree.map(lambda x: x[0], slices), key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(add, zeros, (jnp.arange(microbatches), slices))
        return jax.tree.map(lambda x: x / microbatches, total)

    return run


def make_train_step(gradients: Gradients, tx: optax.GradientTransformationExtraArgs, *, norm_metric: str,
                    skip_nonfinite: bool = False, grad_accum_steps: int = 1):
    """`train_step(trained, opt_state, frozen, batch, key) -> (trained, opt_state, metrics)` from a method's
    gradient function and the optimizer; `norm_metric` names the norm of what is trained in the metrics."""
    gradients = accumulate(gradients, grad_accum_steps)  # metrics become means over the microbatches

    def train_step(trained, opt_state, frozen, batch, key):
        grads, extra, metrics = gradients(trained, frozen, batch, key)
        updates, new_opt_state = tx.update(grads, opt_state, trained, **extra)
        new_trained = optax.apply_updates(trained, updates)
        if skip_nonfinite:  # a NaN/Inf anywhere leaves what is trained and the optimizer state as they were
            finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves((grads, extra, metrics))]))
            new_trained, new_opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                      (new_trained, new_opt_state), (trained, opt_state))
        metrics.update({"update_norm": optax.tree.norm(updates), norm_metric: optax.tree.norm(new_trained)})
        return new_trained, new_opt_state, metrics

    return train_step
