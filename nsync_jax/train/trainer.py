"""Learning a style: Textual Inversion, NSYNC, DreamArtist and StyleForge on one trainer.

Read top to bottom: validate the config and the data, load the frozen model, cache the VAE posteriors,
build the optimizer and the jitted step, restore a checkpoint if the workdir has one, loop, export.

Only the new token rows `(num_vectors, width)` are trained (DreamArtist: the positive word's rows, then
its negative word's, one matrix). Every step is one pure function
`train_step(rows, opt_state, frozen, batch, key)` under `jax.jit`: the frozen model is an argument (never a
captured constant), the rows and optimizer state are donated, and the step's randomness is
`fold_in(key(seed), step)`. Which examples a step uses is a function of `(seed, step)` as well, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.

NSYNC's step runs its positive, negative and anchor groups through the text encoder and UNet as one batch.
Each group reads its own copy of the token rows, so one backward pass returns the three gradients
(g_p, g_n, g_a) at once; `optim.orthogonal_projection` then refines them inside the optax chain.

DreamArtist's step runs the same pass with two groups on the same noisy latents: the prompts with the
negative word `<token>-neg`, then the prompts with `<token>`. It fuses the two predictions as classifier-free
guidance does, eps_n + gamma(t) (eps_p - eps_n), and takes the denoising loss (and optionally a pixel L1
through the frozen VAE decoder) on the fused prediction, so one gradient reaches both words: the positive's
through gamma, the negative's through (1 - gamma).

StyleForge's step (DreamBooth's dual binding) runs a StyleRef group ("zwx style") and an Aux group ("style")
through the same weights, each with its own noise and timesteps, and minimises MSE(ref) + lambda MSE(aux); what
is trained is LoRA adapters or the full weights (`trainable`), as for any method. Its data are in `styleforge`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from nsync_jax import distributed, export, lora, negatives, tokens
from nsync_jax.data import tfds_style
from nsync_jax.data.style_dataset import StyleDataset, build_style_dataset, find_style_items, mask_weights
from nsync_jax.errors import UserError
from nsync_jax.optim import (ANCHOR_VARIANTS, VARIANTS, clip_row_blocks, ema_reset, orthogonal_projection,
                             scale_row_blocks)
from nsync_jax.pipeline import StableDiffusion, load_pipeline
from nsync_jax.sampling import SampleSettings
from nsync_jax.train import outputs, styleforge
from nsync_jax.schedulers import NoiseSchedule, add_noise, predicted_original, training_target
from nsync_jax.models.vae import sample_posterior

METHODS = ("textual_inversion", "nsync", "dreamartist", "styleforge")
TRAINABLE = ("embeddings", "lora", "full")
# DreamArtist's gamma(t) = lo + (hi - lo) r(t / (T - 1)), as the released extension's dynamic CFG.
GUIDANCE_SCHEDULES = ("constant", "ln", "cos", "cos2")
# DreamArtist's negative word is `<token>-neg` in prompts and `<name>-neg.pt` on disk, as released.
NEGATIVE_SUFFIX = "-neg"
# Prompts for images without captions (Textual Inversion's style templates).
STYLE_TEMPLATES = ("a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
                   "a cropped painting in the style of {}", "a good painting in the style of {}",
                   "a close-up painting in the style of {}", "a nice painting in the style of {}")


# ------------------------------------------------------------------------------------------------------------
# Config: every key with its default; experiment files in configs/ start from this and change what they need.
# ------------------------------------------------------------------------------------------------------------

def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ""  # diffusers-format Stable Diffusion folder
    config.method = "nsync"  # or "textual_inversion", "dreamartist", "styleforge"
    config.placeholder_token = "<style>"
    config.initializer_token = "painting"
    config.initializer_embedding = ""  # or a diffusers/A1111 embedding file to start from (num_vectors rows)
    config.num_vectors = 1  # rows of the learned word (DreamArtist: of the positive word)
    config.clip_skip = 0
    # What is trained: "embeddings" (the token rows: Textual Inversion, NSYNC, DreamArtist), "lora" (low-rank
    # adapters on attention projections) or "full" (the UNet, and the text encoder with full.train_text_encoder).
    # With lora/full no token rows are added: prompts use placeholder_token as plain text (pick a rare word such
    # as "zwx", as DreamBooth and StyleForge do).
    config.trainable = "embeddings"
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 4
    config.lora.alpha = 4.0  # the update is (alpha / rank) x down up
    config.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")  # UNet linear layers (path suffixes)
    config.lora.text_encoder = False  # also adapt the text encoder's q_proj, k_proj, v_proj, out_proj
    config.full = ml_collections.ConfigDict()
    config.full.train_text_encoder = True  # the VAE is always frozen

    config.data = ml_collections.ConfigDict()
    config.data.images = ""
    config.data.captions = ""  # empty: Textual Inversion style templates instead of captions
    config.data.negatives = ""
    # Or a dataset written by `nsync-jax data prepare` (tfds, array_record) and its split: replaces the three.
    config.data.prepared = ""
    config.data.split = "train"
    config.data.resolution = 512
    config.data.resize = "squash"  # as the released code; or "center_crop", "random_crop" (StyleForge)
    config.data.flip = True  # each example mirrored at random (NSYNC, DreamArtist); StyleForge does not
    config.data.aux_images = ""  # StyleForge's Aux images (bound to styleforge.class_prompt) ...
    config.data.aux_captions = ""  # ... and their captions (optional)
    config.data.skip_bad_items = False

    config.train = ml_collections.ConfigDict()
    config.train.steps = 8000
    config.train.batch_size = 2  # NSYNC: triples (positive, negative, anchor) per step
    config.train.learning_rate = 5e-4
    config.train.scale_lr = True  # multiply by the batch size, as the released code
    config.train.weight_decay = 1e-2  # torch's AdamW default; applies to the token rows only
    config.train.seed = 0
    config.train.dtype = "float32"  # compute dtype of the frozen model; rows and Adam state stay float32
    config.train.remat = False  # recompute UNet activations in the backward pass: less memory at 768 px and up
    # Split each step's batch into this many microbatches run one after the other (activation memory of one
    # microbatch), their gradients averaged before the update; the batch must split evenly over the devices.
    config.train.grad_accum_steps = 1
    config.train.nonfinite = "stop"  # a NaN/Inf loss or gradient: "stop" the run, or "skip" that update
    # >0: draw training timesteps from [0, max_timestep) only, for weights that are to denoise only there (sample
    # with the base model above it: `nsync-jax sample --handoff-timestep`); 0: every timestep of the schedule.
    config.train.max_timestep = 0
    config.train.log_every_steps = 10  # metrics.jsonl and TensorBoard scalars (WORKDIR/tensorboard)
    # A grid of the first `sample.count` training prompts drawn with the token as learned so far, every this
    # many steps (0: never), as WORKDIR/samples/step_NNNNNN.png; the same noise every time.
    config.train.sample_every_steps = 0
    config.sample = ml_collections.ConfigDict()
    config.sample.count = 4
    config.sample.steps = 25
    config.sample.scheduler = "ddim"
    config.sample.guidance = 7.5
    config.sample.seed = 0

    config.nsync = ml_collections.ConfigDict()
    config.nsync.variant = "orthogonal_anchor"  # the paper's rule; "released" reproduces the released code
    config.nsync.granularity = "global"
    config.nsync.share_noise = False  # positive and its negative draw the same latent noise and timestep

    # DreamArtist (configs/dreamartist_*.py hold the released settings).
    config.dreamartist = ml_collections.ConfigDict()
    config.dreamartist.num_negative_vectors = 6  # rows of the negative word `<placeholder_token>-neg`
    config.dreamartist.negative_init_std = 1e-3  # the negative rows start at the initializer plus N(0, std^2)
    config.dreamartist.guidance = 3.0  # gamma of the fusion; with a schedule, gamma at t = T - 1
    config.dreamartist.guidance_schedule = "constant"  # or "ln", "cos", "cos2": from guidance_min at t = 0
    config.dreamartist.guidance_min = None  # gamma at t = 0: set with a schedule only
    config.dreamartist.reconstruction = False  # add the pixel L1 of the fused x0 through the frozen decoder
    config.dreamartist.reconstruction_weight = 1.0  # lambda_rec
    config.dreamartist.grad_clip_norm = 1.0  # each word's gradient clipped to this norm on its own
    config.dreamartist.neg_lr_weight = 1.0  # the negative word's learning rate is this times train.learning_rate
    config.dreamartist.ema_weight = 1.0  # < 1: keep an EMA of the rows (this decay) ...
    config.dreamartist.ema_rep_step = 25  # ... and copy it into the rows every this many steps
    # `<stem>_att.<ext>` next to an image in data.images is its attention mask (not a training image): grey
    # levels weight the denoising loss per latent pixel, 0 -> 0, 127 -> 1, 255 -> 5 (the released mapping).
    config.dreamartist.attention_masks = False

    # StyleForge (configs/styleforge_sd15.py, multi_styleforge_sd15.py hold the released settings).
    config.styleforge = ml_collections.ConfigDict()
    config.styleforge.instance_prompt = "zwx style"  # bound to the StyleRef images (data.images)
    config.styleforge.class_prompt = "style"  # bound to the Aux images (data.aux_images)
    config.styleforge.append_captions = False  # prompts "<instance or class prompt>, <caption>"
    config.styleforge.prior_loss_weight = 1.0  # lambda of MSE(ref) + lambda MSE(aux)
    # Without Aux images: draw this many with the class prompt from the base model (DreamBooth's class images,
    # with the sampler of config.sample) into WORKDIR/aux/<concept>, before training.
    config.styleforge.generate_aux = 0
    # Multi-StyleForge: {name: {instance_prompt, class_prompt, images, captions, aux_images, aux_captions}},
    # in place of data.images and the prompts above; "joint" alternates concepts step by step, "sequential"
    # trains them one after the other in the order of their names.
    config.styleforge.concepts = ml_collections.ConfigDict()
    config.styleforge.schedule = "joint"

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3

    # The device mesh (all devices of all processes): the global batch is split over data x fsdp.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: every device not used by the other axis
    config.mesh.fsdp = 1
    config.mesh.shard_frozen_weights = False  # True: split the frozen UNet and text encoder over fsdp
    return config



REQUIRED_KEYS = ("model", "method", "placeholder_token", "initializer_token", "num_vectors", "data.images",
                 "data.captions", "data.negatives", "data.resolution", "train.steps", "train.batch_size",
                 "train.learning_rate", "train.seed", "nsync.variant", "checkpoint.every_steps")


def check_config(config: ml_collections.ConfigDict) -> None:
    for key in REQUIRED_KEYS:
        node = config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UserError(f"config key {key} is missing")
            node = node[part]
    if config.method not in METHODS:
        raise UserError(f"config method={config.method!r} must be one of {', '.join(METHODS)}")
    if config.nsync.variant not in VARIANTS:
        raise UserError(f"config nsync.variant={config.nsync.variant!r} must be one of {', '.join(VARIANTS)}")
    if config.train.get("nonfinite", "stop") not in ("stop", "skip"):
        raise UserError(f"config train.nonfinite={config.train.nonfinite!r} must be 'stop' or 'skip'")
    if config.method == "nsync" and not (config.data.negatives or config.data.get("prepared")):
        raise UserError("config data.negatives is required for method nsync")
    for key in ("num_vectors", "train.steps", "train.batch_size", "checkpoint.every_steps", "data.resolution",
                "train.grad_accum_steps"):
        value = config
        for part in key.split("."):
            value = value[part]
        if not isinstance(value, int) or value < 1:
            raise UserError(f"config {key}={value!r} must be a positive integer")
    max_timestep = config.train.get("max_timestep", 0)
    if not isinstance(max_timestep, int) or max_timestep < 0:
        raise UserError(f"config train.max_timestep={max_timestep!r} must be a non-negative integer (0: all)")
    if config.method == "dreamartist":
        check_dreamartist_config(config)
    if config.method == "styleforge":
        styleforge.check_config(config)
    check_trainable_config(config)


def check_trainable_config(config: ml_collections.ConfigDict) -> None:
    trainable = config.get("trainable", "embeddings")
    if trainable not in TRAINABLE:
        raise UserError(f"config trainable={trainable!r} must be one of {', '.join(TRAINABLE)}")
    if trainable == "embeddings":
        return
    if config.method == "dreamartist":
        raise UserError(f"config trainable={trainable!r} is not supported with method dreamartist (its negative "
                        "word is learned token rows): use trainable='embeddings'")
    if trainable == "lora":
        lora = config.lora
        if not isinstance(lora.rank, int) or lora.rank < 1:
            raise UserError(f"config lora.rank={lora.rank!r} must be a positive integer")
        if not lora.alpha > 0:
            raise UserError(f"config lora.alpha={lora.alpha!r} must be positive")
        if not lora.targets:
            raise UserError("config lora.targets must name at least one UNet linear layer (e.g. to_q)")


def check_dreamartist_config(config: ml_collections.ConfigDict) -> None:
    if "dreamartist" not in config:
        raise UserError("config key dreamartist is missing (start from trainer.default_config())")
    da = config.dreamartist
    for key in ("num_negative_vectors", "ema_rep_step"):
        if not isinstance(da[key], int) or da[key] < 1:
            raise UserError(f"config dreamartist.{key}={da[key]!r} must be a positive integer")
    if da.guidance_schedule not in GUIDANCE_SCHEDULES:
        raise UserError(f"config dreamartist.guidance_schedule={da.guidance_schedule!r} must be one of "
                        f"{', '.join(GUIDANCE_SCHEDULES)}")
    scheduled = da.guidance_schedule != "constant"
    if scheduled != (da.guidance_min is not None):
        raise UserError(f"config dreamartist.guidance_min={da.guidance_min!r}: set it (gamma at t = 0) exactly when "
                        f"dreamartist.guidance_schedule is not 'constant' (it is {da.guidance_schedule!r})")
    if not 0.0 < da.ema_weight <= 1.0:
        raise UserError(f"config dreamartist.ema_weight={da.ema_weight!r} must be in (0, 1] (1: no EMA)")
    if not da.grad_clip_norm > 0:
        raise UserError(f"config dreamartist.grad_clip_norm={da.grad_clip_norm!r} must be positive")
    for key in ("neg_lr_weight", "negative_init_std"):
        if da[key] < 0:
            raise UserError(f"config dreamartist.{key}={da[key]!r} must not be negative")
    if da.reconstruction and not da.reconstruction_weight > 0:
        raise UserError(f"config dreamartist.reconstruction_weight={da.reconstruction_weight!r} must be positive "
                        "with dreamartist.reconstruction=True")
    # The negative of DreamArtist is a learned word, not an image set; one embedding file holds one word.
    if config.data.negatives:
        raise UserError(f"config data.negatives={config.data.negatives!r} is not used by method dreamartist (its "
                        "negative is the learned word <token>-neg): leave it empty")
    if config.get("initializer_embedding"):
        raise UserError("config initializer_embedding is not supported with method dreamartist (it starts both "
                        "words from initializer_token)")


# ------------------------------------------------------------------------------------------------------------
# The loss: one denoising pass over every group of the step.
# ------------------------------------------------------------------------------------------------------------

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


def draw_latents(spec: StepSpec, key, mean, logvar):
    """One group's training inputs from its key: a latent sample of each cached posterior `(batch, h, w, c)`
    (scaled), its noise, and timesteps `(batch,)`."""
    k_latent, k_noise, k_time = jax.random.split(key, 3)
    latents = sample_posterior(mean, logvar, k_latent) * spec.scaling_factor
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    t = jax.random.randint(k_time, (mean.shape[0],), 0, spec.max_timestep or spec.schedule.num_train_timesteps)
    return latents, noise, t


def module_states(spec: StepSpec, name: str, params, frozen) -> tuple:
    """The states `nnx.merge` needs for module `name`: its trainable part (a flat dict of `params`, see
    `lora.flat_params`) when it has one, then its frozen part."""
    if isinstance(params, dict) and name in params:
        return lora.nested_params(params[name]), frozen[name]
    return (frozen[name],)


def denoise(spec: StepSpec, group_params, frozen, ids, mean, logvar, group_keys, shared: bool = False):
    """One denoising pass over every group of a step: text encoder and UNet each run once on all groups.

    Args:
      group_params: one copy per group of what is trained: the token rows `(groups, num_vectors, width)`, or
        `{"unet": {path: (groups, ...)}, "text_encoder": ...}` (LoRA or full weights, flat dicts); with `shared`,
        one set of LoRA or full weights `{"unet": {path: array}, ...}` for every group.
      ids: `(groups, batch, tokens)`; mean, logvar: `(groups, batch, h, w, c)` cached VAE posteriors.
      group_keys: `(groups,)` keys; each group's latent sample, noise and timesteps come from its own key.
    Returns:
      The UNet's float32 predictions and their training targets `(groups, batch, h, w, c)`, the noisy latents
      `(groups, batch, h, w, c)` and the timesteps `(groups, batch)`.
    """
    def run_unet(unet_states, x, t, context):
        return nnx.merge(spec.graphdefs["unet"], *unet_states)(x, t, context)

    if spec.remat:  # keep only the UNet's inputs for the backward pass and recompute the rest
        run_unet = jax.checkpoint(run_unet)

    def one_pass(params, rows, ids, latents, noise, t):
        """Text encoder and UNet on a batch `(n, ...)`, with `params` the trainable weights (or None)."""
        text_encoder = nnx.merge(spec.graphdefs["text_encoder"], *module_states(spec, "text_encoder", params,
                                                                               frozen))
        table = text_encoder.embeddings.token_embedding.embedding[...]
        rows = jnp.zeros((0, table.shape[-1]), table.dtype) if rows is None else rows
        embeds = tokens.embed_tokens(table, rows, ids)
        context = text_encoder(inputs_embeds=embeds, clip_skip=spec.clip_skip)
        noisy = add_noise(spec.schedule.alphas_cumprod, latents, noise, t)
        prediction = run_unet(module_states(spec, "unet", params, frozen), noisy.astype(spec.compute_dtype), t,
                              context.astype(spec.compute_dtype))
        target = training_target(spec.schedule, latents, noise, t)
        return prediction.astype(jnp.float32), target, noisy

    groups, batch = ids.shape[:2]
    flat = lambda x: x.reshape(groups * batch, *x.shape[2:])
    by_group = lambda x: x.reshape(groups, batch, *x.shape[1:])
    latents, noise, t = jax.vmap(functools.partial(draw_latents, spec))(group_keys, mean, logvar)
    if shared:  # one set of weights: every group runs as one batch
        prediction, target, noisy = one_pass(group_params, None, flat(ids), flat(latents), flat(noise), flat(t))
        return by_group(prediction), by_group(target), by_group(noisy), t
    if isinstance(group_params, dict):
        # Trained weights: each group runs with its own copy (vmapped), so one backward pass gives every group's
        # gradient. The frozen weights are shared (not mapped).
        prediction, target, noisy = jax.vmap(lambda p, i, x, n, s: one_pass(p, None, i, x, n, s))(
            group_params, ids, latents, noise, t)
        return prediction, target, noisy, t
    # Token rows: each group embeds its prompts with its own copy, then every group runs as one batch.
    embed_rows = group_params
    text_encoder = nnx.merge(spec.graphdefs["text_encoder"], frozen["text_encoder"])
    table = text_encoder.embeddings.token_embedding.embedding[...]
    embeds = jax.vmap(lambda rows, group_ids: tokens.embed_tokens(table, rows, group_ids))(embed_rows, ids)
    context = text_encoder(inputs_embeds=flat(embeds), clip_skip=spec.clip_skip)
    latents, noise, t = flat(latents), flat(noise), flat(t)
    noisy = add_noise(spec.schedule.alphas_cumprod, latents, noise, t)
    prediction = run_unet((frozen["unet"],), noisy.astype(spec.compute_dtype), t, context.astype(spec.compute_dtype))
    target = training_target(spec.schedule, latents, noise, t)
    return by_group(prediction.astype(jnp.float32)), by_group(target), by_group(noisy), by_group(t)


def denoising_losses(spec: StepSpec, group_params, frozen, ids, mean, logvar, group_keys, shared: bool = False):
    """Per-group denoising losses `(groups,)`: the mean over each group's elements (arguments as `denoise`)."""
    prediction, target, _, _ = denoise(spec, group_params, frozen, ids, mean, logvar, group_keys, shared)
    return jnp.mean(jnp.square(prediction - target), axis=(2, 3, 4)).mean(axis=1)


def group_keys(key, groups: int, share_noise: bool):
    """One key per group; group 1 reuses group 0's key when the two share their noise (NSYNC's positive and
    its negative with `share_noise`; DreamArtist's two words always)."""
    ids = [0, 0 if share_noise else 1, 2][:groups] if groups > 1 else [0]
    return jnp.stack([jax.random.fold_in(key, i) for i in ids])


def group_gradients(spec: StepSpec, groups: int, share_noise: bool, params, frozen, batch, key):
    """Textual Inversion (one group) and NSYNC (positive, negative and, for the variants that read it, anchor):
    each group's gradient of its own denoising loss, from one pass. `params` is what is trained (token rows, or
    LoRA or full weights). Returns (the positive gradient, NSYNC's extra optimizer arguments, metrics)."""
    batch = jax.tree.map(lambda x: x[:groups], batch)  # NSYNC's batches carry an anchor group; not run when unread

    def total_loss(group_params):
        losses = denoising_losses(spec, group_params, frozen, batch["ids"], batch["mean"], batch["logvar"],
                                  group_keys(key, groups, share_noise))
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


# ------------------------------------------------------------------------------------------------------------
# DreamArtist: the negative word's and the positive word's predictions fused as classifier-free guidance.
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DreamArtistSpec:
    """What DreamArtist's step needs to know statically (from `config.dreamartist`)."""

    num_positive_vectors: int  # the first rows are the positive word's, the rest the negative word's
    guidance: float  # gamma, or gamma at t = T - 1 with a schedule
    guidance_schedule: str = "constant"
    guidance_min: float | None = None  # gamma at t = 0 with a schedule
    reconstruction_weight: float = 0.0  # 0: no pixel reconstruction term

    @classmethod
    def from_config(cls, config) -> DreamArtistSpec:
        da = config.dreamartist
        return cls(num_positive_vectors=config.num_vectors, guidance=da.guidance,
                   guidance_schedule=da.guidance_schedule, guidance_min=da.guidance_min,
                   reconstruction_weight=da.reconstruction_weight if da.reconstruction else 0.0)


def fusion_guidance(da: DreamArtistSpec, t: jax.Array, num_train_timesteps: int) -> jax.Array:
    """gamma(t) `(batch,)` float32: constant, or guidance_min + (guidance - guidance_min) r(t / (T - 1)), rising
    with the noise level."""
    if da.guidance_schedule == "constant":
        return jnp.full(t.shape, da.guidance, jnp.float32)
    rho = t.astype(jnp.float32) / (num_train_timesteps - 1)
    ramp = {"ln": lambda: rho, "cos": lambda: jnp.cos((rho - 1) * jnp.pi / 2),
            "cos2": lambda: 1 - jnp.cos(rho * jnp.pi / 2)}[da.guidance_schedule]()
    return da.guidance_min + (da.guidance - da.guidance_min) * ramp


def dreamartist_losses(spec: StepSpec, da: DreamArtistSpec, rows, frozen, batch, key):
    """DreamArtist's loss and its parts `{"loss_denoise", "loss_reconstruction"}` for one step.

    Args:
      rows: `(num_positive_vectors + num_negative_vectors, width)`, the positive word's rows, then the negative's.
      batch: ids `(2, batch, tokens)`, the negative word's prompts then the positive word's (as released);
        mean, logvar `(1, batch, h, w, c)`; with reconstruction, pixels `(1, batch, H, W, 3)` in [-1, 1]; with
        attention masks, weights `(1, batch, h, w)` of the squared error.
    """
    # Both groups read the same posteriors with the same key: the two words see the same noisy latents and
    # timesteps, and the UNet runs once on the batch of both.
    both = lambda x: jnp.broadcast_to(x, (2, *x.shape[1:]))
    prediction, target, noisy, t = denoise(spec, both(rows[None]), frozen, batch["ids"], both(batch["mean"]),
                                           both(batch["logvar"]), group_keys(key, 2, share_noise=True))
    negative, positive = prediction[0], prediction[1]
    gamma = fusion_guidance(da, t[1], spec.schedule.num_train_timesteps)[:, None, None, None]
    fused = negative + gamma * (positive - negative)
    # In the model's own parameterisation (v for v-prediction models), as the other methods' loss: fusing v is
    # fusing eps (the two are affine in each other at fixed x_t), and the v loss is the eps loss / abar_t.
    squared = jnp.square(fused - target[1])
    if "weights" in batch:  # attention masks, per latent pixel
        squared = squared * batch["weights"][0][..., None]
    parts = {"loss_denoise": jnp.mean(squared)}
    loss = parts["loss_denoise"]
    if da.reconstruction_weight:
        vae = nnx.merge(spec.graphdefs["vae"], frozen["vae"])
        latents = predicted_original(spec.schedule, noisy[1], fused, t[1]) / spec.scaling_factor
        images = vae.decode(latents.astype(spec.compute_dtype), remat=True).astype(jnp.float32)
        parts["loss_reconstruction"] = jnp.mean(jnp.abs(images - batch["pixels"][0]))
        loss = loss + da.reconstruction_weight * parts["loss_reconstruction"]
    return loss, parts


def dreamartist_gradients(spec: StepSpec, da: DreamArtistSpec, rows, frozen, batch, key):
    """The gradient of DreamArtist's loss on both words' rows, no extra optimizer arguments, and metrics."""
    (loss, parts), grads = jax.value_and_grad(dreamartist_losses, argnums=2, has_aux=True)(
        spec, da, rows, frozen, batch, key)
    positive, negative = grads[:da.num_positive_vectors], grads[da.num_positive_vectors:]
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(positive),
               "negative_grad_norm": optax.tree.norm(negative)}
    return grads, {}, metrics


# ------------------------------------------------------------------------------------------------------------
# StyleForge: StyleRef and Aux examples bound to their prompts in one pass through the same weights.
# ------------------------------------------------------------------------------------------------------------

def styleforge_losses(spec: StepSpec, prior_loss_weight: float, params, frozen, batch, key):
    """MSE(ref) + lambda MSE(aux) and its parts. batch: ids, mean, logvar `(2, batch, ...)`, the StyleRef
    group then the Aux group; each group draws its own latent sample, noise and timesteps."""
    losses = denoising_losses(spec, params, frozen, batch["ids"], batch["mean"], batch["logvar"],
                              group_keys(key, 2, share_noise=False), shared=True)
    return losses[0] + prior_loss_weight * losses[1], {"loss_instance": losses[0], "loss_prior": losses[1]}


def styleforge_gradients(spec: StepSpec, prior_loss_weight: float, params, frozen, batch, key):
    """The gradient of StyleForge's loss, no extra optimizer arguments, and metrics."""
    (loss, parts), grads = jax.value_and_grad(styleforge_losses, argnums=2, has_aux=True)(
        spec, prior_loss_weight, params, frozen, batch, key)
    return grads, {}, {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}


# ------------------------------------------------------------------------------------------------------------
# The step and its optimizer.
# ------------------------------------------------------------------------------------------------------------

def accumulate(gradients, microbatches: int):
    """`gradients(params, frozen, batch, key) -> (grads, extra, metrics)` over `microbatches` slices of the batch
    (arrays `(groups, batch, ...)`), run one after the other under `lax.scan`: the means of all three. Slice i
    takes every `microbatches`-th example from i, so each device keeps its own examples; its key is
    `fold_in(key, i)`."""
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


def make_train_step(spec: StepSpec, tx: optax.GradientTransformationExtraArgs, method: str, share_noise: bool,
                    skip_nonfinite: bool = False, dreamartist: DreamArtistSpec | None = None,
                    prior_loss_weight: float = 1.0, grad_accum_steps: int = 1,
                    nsync_variant: str = "orthogonal_anchor"):
    if method == "dreamartist":
        gradients = functools.partial(dreamartist_gradients, spec, dreamartist)
    elif method == "styleforge":
        gradients = functools.partial(styleforge_gradients, spec, prior_loss_weight)
    else:
        groups = (3 if nsync_variant in ANCHOR_VARIANTS else 2) if method == "nsync" else 1
        gradients = functools.partial(group_gradients, spec, groups, share_noise)
    gradients = accumulate(gradients, grad_accum_steps)  # metrics become means over the microbatches

    def train_step(rows, opt_state, frozen, batch, key):
        grads, extra, metrics = gradients(rows, frozen, batch, key)
        updates, new_opt_state = tx.update(grads, opt_state, rows, **extra)
        new_rows = optax.apply_updates(rows, updates)
        if skip_nonfinite:  # a NaN/Inf anywhere leaves the rows and optimizer state as they were
            finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves((grads, extra, metrics))]))
            new_rows, new_opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                   (new_rows, new_opt_state), (rows, opt_state))
        norm_name = "param_norm" if isinstance(new_rows, dict) else "row_norm"
        metrics.update({"update_norm": optax.tree.norm(updates), norm_name: optax.tree.norm(new_rows)})
        return new_rows, new_opt_state, metrics

    return train_step


def make_optimizer(config) -> optax.GradientTransformationExtraArgs:
    learning_rate = config.train.learning_rate * (config.train.batch_size if config.train.get("scale_lr") else 1)
    adamw = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.train.get("weight_decay", 1e-2))
    if config.method == "nsync":
        return optax.chain(orthogonal_projection(config.nsync.variant, config.nsync.get("granularity", "global")),
                           adamw)
    if config.method == "dreamartist":
        da, sizes = config.dreamartist, tuple(count for _, _, count in learned_words(config))
        # Each word is its own torch parameter in the released code: clipped alone, with its own learning rate.
        chain = [clip_row_blocks(sizes, da.grad_clip_norm), adamw, scale_row_blocks(sizes, (1.0, da.neg_lr_weight))]
        if da.ema_weight < 1:
            chain.append(ema_reset(da.ema_weight, da.ema_rep_step))
        return optax.chain(*chain)
    return optax.with_extra_args_support(adamw)


# ------------------------------------------------------------------------------------------------------------
# Data: prompts, cached posteriors, and the examples of each step (a function of seed and step).
# ------------------------------------------------------------------------------------------------------------

def learned_words(config) -> list[tuple[str, str, int]]:
    """(file suffix, token, rows) of each word a run learns, in the order of the trained row matrix: the
    placeholder token, then for DreamArtist its negative word `<token>-neg` (file `<name>-neg.<ext>`)."""
    words = [("", config.placeholder_token, config.num_vectors)]
    if config.method == "dreamartist":
        words.append((NEGATIVE_SUFFIX, config.placeholder_token + NEGATIVE_SUFFIX,
                      config.dreamartist.num_negative_vectors))
    return words


def add_learned_words(tokenizer, config) -> None:
    """Adds every learned word to the tokenizer, with consecutive ids from `len(tokenizer)`: row i of the
    trained matrix is token id `len(table) + i`."""
    for _, token, count in learned_words(config):
        tokens.add_placeholder_tokens(tokenizer, token, count)


@dataclasses.dataclass
class PreparedData:
    ids: np.ndarray  # (N or templates, tokens) int32 prompt ids for each positive (captioned) or template
    positives: np.ndarray  # (N, 2, h, w, 2c) posterior moments of each image and its mirror image
    negatives: np.ndarray | None
    captioned: bool
    negative_word_ids: np.ndarray | None = None  # DreamArtist: `ids` with the negative word for the token
    loss_weights: np.ndarray | None = None  # DreamArtist's attention masks: (N, 2, h, w), the mirror second
    images: np.ndarray | None = None  # (N, H, W, 3) in [-1, 1], for DreamArtist's pixel reconstruction


def encode_posteriors(pipe: StableDiffusion, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """VAE posterior moments `(N, 2, h, w, 2c)` of each image and its horizontal flip, computed once."""
    graphdef, state = nnx.split(pipe.vae)
    encode = jax.jit(lambda state, x: jnp.concatenate(nnx.merge(graphdef, state).encode(x), axis=-1))
    both = np.stack([images, images[:, :, ::-1]], axis=1)
    flat = both.reshape(-1, *images.shape[1:])
    dtype = pipe.vae.encoder.conv_in.kernel[...].dtype
    moments = [np.asarray(encode(state, jnp.asarray(flat[i:i + batch_size], dtype)), np.float32)
               for i in range(0, len(flat), batch_size)]
    moments = np.concatenate(moments)
    return moments.reshape(len(images), 2, *moments.shape[1:])


def training_prompts(dataset: StyleDataset, word: str) -> list[str]:
    """"<caption> in the style of <word>" per image, or Textual Inversion's style templates without captions."""
    if any(dataset.captions):
        return [f"{caption} in the style of {word}" for caption in dataset.captions]
    return [template.format(word) for template in STYLE_TEMPLATES]


def _loss_weights(masks: np.ndarray, latent_size: int) -> np.ndarray:
    """Attention masks as loss weights at latent size, for each image and its mirror image `(N, 2, h, w)`."""
    weights = mask_weights(masks, latent_size)
    return np.stack([weights, weights[:, :, ::-1]], axis=1)


def prepare_data(pipe: StableDiffusion, dataset: StyleDataset, token: str, *, negative_word: str | None = None,
                 keep_images: bool = False) -> PreparedData:
    """Prompt ids and cached posteriors. `negative_word`: also the same prompts with it in place of `token`
    (DreamArtist's negative prompts); `keep_images`: keep the pixels (for a reconstruction loss)."""
    captioned = any(dataset.captions)

    def prompt_ids(word):
        prompts = training_prompts(dataset, word)
        return tokens.tokenize(pipe.tokenizer, [tokens.expand_placeholders(p, pipe.tokenizer) for p in prompts])

    negatives = encode_posteriors(pipe, dataset.negatives) if dataset.negatives is not None else None
    positives = encode_posteriors(pipe, dataset.positives)
    return PreparedData(ids=prompt_ids(token), positives=positives,
                        negatives=negatives, captioned=captioned,
                        negative_word_ids=prompt_ids(negative_word) if negative_word else None,
                        loss_weights=_loss_weights(dataset.masks, positives.shape[2]) if dataset.masks is not None
                        else None,
                        images=dataset.positives if keep_images else None)


def step_batch(data: PreparedData, method: str, batch_size: int, seed: int, step: int,
               flip: bool = True) -> dict[str, np.ndarray]:
    """The examples of one step: positives (and their negatives and random other positives for NSYNC; for
    DreamArtist, their prompts with the negative word, then with the token), each mirrored at random (`flip`)."""
    rng = np.random.default_rng([seed, step])
    count = len(data.positives)
    index = rng.integers(0, count, batch_size)
    groups = [(data.positives, index)]
    if method == "nsync":
        anchor = (index + rng.integers(1, count, batch_size)) % count if count > 1 else index
        groups += [(data.negatives, index), (data.positives, anchor)]
    flips = rng.integers(0, 2, (len(groups), batch_size))
    if not flip:  # drawn all the same, so that the other draws do not depend on `flip`
        flips = np.zeros_like(flips)
    moments = np.stack([source[i, flips[g]] for g, (source, i) in enumerate(groups)])
    if data.captioned:
        ids = np.stack([data.ids[i] for _, i in groups])
    else:
        template = rng.integers(0, len(data.ids), batch_size)
        ids = np.stack([data.ids[template]] * len(groups))
    mean, logvar = np.split(moments, 2, axis=-1)
    batch = {"ids": ids, "mean": mean, "logvar": logvar}
    if method == "dreamartist":
        prompt = index if data.captioned else template
        batch["ids"] = np.stack([data.negative_word_ids[prompt], data.ids[prompt]])  # negatives first, as released
        if data.images is not None:
            pixels = [data.images[i][:, ::-1] if flip else data.images[i] for i, flip in zip(index, flips[0])]
            batch["pixels"] = np.stack(pixels)[None]
        if data.loss_weights is not None:
            batch["weights"] = data.loss_weights[index, flips[0]][None]
    return batch


# ------------------------------------------------------------------------------------------------------------
# Checkpoints (Orbax): the token rows, the optimizer state and the step; data order and noise are
# functions of (seed, step), so nothing else is needed to resume exactly.
# ------------------------------------------------------------------------------------------------------------

def checkpoint_manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def trained_key(params) -> str:
    """The checkpoint's name for what is trained: "rows" (token rows) or "params" (LoRA or full weights)."""
    return "params" if isinstance(params, dict) else "rows"


def save_checkpoint(manager, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step`: collective on every host;
    asynchronous after the arrays are copied off the devices, so the caller may donate them at once."""
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(manager, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checkpoint `step`'s state, restored onto the structure, shapes and shardings of `like` as they are now,
    and its metadata."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


@contextlib.contextmanager
def stop_on_sigterm(enabled: bool = True):
    """Within it, SIGTERM appends True to the yielded list instead of killing the process, so that a training
    loop can checkpoint and stop at the end of its step; the previous handler comes back on exit."""
    stop_requested: list[bool] = []
    if not enabled:
        yield stop_requested
        return
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    try:
        yield stop_requested
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def read_checkpoint_rows(workdir: Path, step: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The token rows and metadata of a checkpoint (the latest when `step` is None), for export."""
    trained, meta = read_checkpoint(workdir, step)
    if "rows" not in trained:
        raise UserError(f"{workdir}: the run trained trainable={meta['config'].get('trainable')!r}, not token "
                        f"embeddings: export it with --format {' or '.join(export.MODEL_FORMATS)}")
    return np.asarray(trained["rows"], np.float32), meta


def read_checkpoint(workdir: Path, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a checkpoint trained (`{"rows": array}` or `{"params": {component: {path: array}}}`, as numpy,
    without the optimizer state) and its metadata; the latest checkpoint when `step` is None."""
    manager = checkpoint_manager(Path(workdir), keep=1_000_000)
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"{workdir}: no checkpoints in {Path(workdir) / 'checkpoints'}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"{workdir}: no checkpoint for step {step} (have {', '.join(map(str, sorted(steps)))})")
    # Onto this process's first device, whatever mesh or hosts wrote the checkpoint.
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        manager.item_metadata(step)["state"])
    state, meta = restore_checkpoint(manager, step, like)
    return {k: jax.tree.map(np.asarray, v) for k, v in state.items() if k != "opt_state"}, meta


def starting_rows(config, table: np.ndarray, tokenizer) -> np.ndarray:
    """The token rows before training: an embedding file's (to continue or fine-tune a learned token), or
    copies of the initializer word's row (DreamArtist: for both words, the negative's plus small noise)."""
    if config.method == "dreamartist":
        (_, _, positive), (_, _, negative) = learned_words(config)
        rows = tokens.initial_rows(table, tokenizer, config.initializer_token, positive + negative)
        noise = np.random.default_rng(config.train.seed).normal(0.0, config.dreamartist.negative_init_std,
                                                                rows[positive:].shape)
        rows[positive:] += noise.astype(np.float32)
        return rows
    if not config.get("initializer_embedding"):
        return tokens.initial_rows(table, tokenizer, config.initializer_token, config.num_vectors)
    path = Path(config.initializer_embedding)
    learned = tokens.load_learned_embeddings(path)
    if len(learned) != 1:
        raise UserError(f"{path}: holds {len(learned)} tokens; config initializer_embedding needs a file with one")
    rows = next(iter(learned.values()))
    if rows.shape != (config.num_vectors, table.shape[1]):
        raise UserError(f"{path}: embedding of shape {rows.shape}, the run needs (num_vectors, width) = "
                        f"({config.num_vectors}, {table.shape[1]})")
    return rows


def export_metadata(config, step: int) -> dict[str, Any]:
    metadata = {"base_model": str(config.model), "token": config.placeholder_token,
                "num_vectors": config.num_vectors, "initializer_token": config.initializer_token, "step": step,
                "method": config.method, "variant": config.nsync.variant if config.method == "nsync" else None}
    kind = config.get("trainable", "embeddings")
    if kind != "embeddings":
        metadata.update(trainable=kind, num_vectors=0)
    if kind == "lora":
        metadata.update(lora_rank=config.lora.rank, lora_alpha=config.lora.alpha,
                        lora_text_encoder=config.lora.get("text_encoder", False))
    if config.train.get("max_timestep", 0):  # sample with the base model at and above it (--handoff-timestep)
        metadata.update(handoff_timestep=config.train.max_timestep)
    if config.method == "styleforge":  # what to prompt with: the identifiers, not placeholder_token
        metadata.update(token=None, prompts={c.name: c.instance_prompt
                                             for c in styleforge.concepts_from_config(config)})
    if config.method == "dreamartist":  # the training gamma is the CFG scale to start sampling from
        metadata.update(negative_token=config.placeholder_token + NEGATIVE_SUFFIX,
                        guidance=config.dreamartist.guidance)
    return metadata


def export_words(path: Path, config, rows: np.ndarray, step: int, fmt: str = "diffusers") -> list[Path]:
    """Writes each learned word of a run in its own file (see `learned_words`): the token at `path`,
    DreamArtist's negative word at `<stem>-neg<suffix>` next to it. Returns the files written."""
    written, first = [], 0
    for suffix, token, count in learned_words(config):
        target = export.sibling_path(Path(path), suffix)
        metadata = dict(export_metadata(config, step), token=token, num_vectors=count)
        export.write_embeddings(target, token, rows[first:first + count], fmt=fmt, metadata=metadata)
        written.append(target)
        first += count
    return written


def export_run(workdir: Path, output: Path, fmt: str, step: int | None = None) -> str:
    """Writes a LoRA or full fine-tuning checkpoint for diffusers or A1111; returns a line saying what it wrote.

    `diffusers-lora` (LoRA runs): a `.safetensors` for `pipe.load_lora_weights`; `a1111-lora`: one in
    kohya-ss's layout, for A1111 and ComfyUI (diffusers reads it too). `diffusers-pipeline`: a complete
    diffusers folder from the base model with the trained UNet and text encoder (LoRA runs: the adapters
    merged into the weights).
    """
    trained, meta = read_checkpoint(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    kind = config.get("trainable", "embeddings")
    if "params" not in trained:
        raise UserError(f"{workdir}: the run trained token embeddings: export it with --format diffusers or "
                        "a1111")
    params = trained["params"]
    if fmt in export.LORA_FORMATS:
        if kind != "lora":
            raise UserError(f"{workdir}: --format {fmt} needs a run with trainable='lora' (this one is "
                            f"{kind!r}): use --format diffusers-pipeline")
        lora.write_lora_file(output, params, lora_scale(config), metadata=export_metadata(config, meta["step"]),
                             layout=export.LORA_FORMATS[fmt])
        return f"wrote {output} (LoRA rank {config.lora.rank}, {', '.join(params)}), step {meta['step']}"
    if fmt != "diffusers-pipeline":
        raise UserError(f"--format must be one of {', '.join(export.MODEL_FORMATS)} for a {kind} run, "
                        f"got {fmt!r}")
    pipe = load_pipeline(config.model)
    modules = {name: pipe.modules()[name] for name in params}
    merge_trained(modules, params, config, source=workdir)
    export.write_diffusers_pipeline(output, config.model, modules)
    return f"wrote {output} (base {config.model}, trained {', '.join(params)}), step {meta['step']}"


def merge_trained(modules: dict, params: dict, config, source: Path) -> None:
    """Puts a LoRA or full fine-tuning run's weights `{component: {path: array}}` into a base model's modules
    (LoRA: merged into the plain weights, as diffusers' fuse_lora)."""
    if config.trainable == "lora":
        deltas = lora.read_lora_state(lora.lora_state_dict(params, lora_scale(config)), source=source)
        lora.merge_lora(modules, deltas, source=source)
        return
    for name, flat in params.items():
        nnx.update(modules[name], lora.nested_params({k: jnp.asarray(v) for k, v in flat.items()}))


def load_training_data(config: ml_collections.ConfigDict) -> StyleDataset:
    """The validated style dataset: from folders (`data.images`, ...) or a prepared tfds dataset."""
    data = config.data
    if data.get("prepared"):
        if config.method == "dreamartist" and config.dreamartist.get("attention_masks", False):
            raise UserError("config dreamartist.attention_masks needs data.images (prepared datasets hold no masks)")
        items = tfds_style.read(data.prepared, data.get("split", "train"))
        if config.method == "nsync" and items[0].negative is None:
            raise UserError(f"{data.prepared}: the prepared dataset has no negatives, which method nsync needs")
    else:
        masks = config.method == "dreamartist" and config.dreamartist.get("attention_masks", False)
        items = find_style_items(data.images, captions=data.captions or None, negatives=data.negatives or None,
                                 skip_bad_items=data.get("skip_bad_items", False), masks=masks)
    return build_style_dataset(items, data.resolution, data.get("resize", "squash"), config.train.seed)


def prepare_concepts(pipe: StableDiffusion, config, workdir: Path, progress: bool) -> list[styleforge.ConceptData]:
    """Each StyleForge concept's prompt ids and cached posteriors. Aux images a concept does not give are drawn
    first with its class prompt into WORKDIR/aux/<concept> (resumable: a rerun keeps the images drawn)."""
    ids = lambda prompts: tokens.tokenize(pipe.tokenizer, prompts)
    prepared = []
    for concept in styleforge.concepts_from_config(config):
        aux_folder = workdir / "aux" / concept.name
        if not concept.aux_images:
            sample, resolution = config.sample, config.data.resolution
            settings = SampleSettings(scheduler=sample.scheduler, steps=sample.steps, guidance=sample.guidance,
                                      height=resolution, width=resolution, clip_skip=config.get("clip_skip", 0))
            negatives.generate_set(pipe, {"aux": concept.class_prompt}, aux_folder, settings=settings,
                                   seed=config.train.seed, images_per_caption=config.styleforge.generate_aux,
                                   model_name=str(config.model), progress=progress)
            distributed.barrier("styleforge_aux")  # process 0 wrote the files the others read next
        images = styleforge.read_concept(concept, aux_folder, config)
        prepared.append(styleforge.ConceptData(
            style_prompts=images.style_prompts, style_ids=ids(images.style_prompts),
            style_refs=encode_posteriors(pipe, images.style_refs.positives),
            aux_ids=ids(images.aux_prompts), aux=encode_posteriors(pipe, images.aux.positives)))
    return prepared


# ------------------------------------------------------------------------------------------------------------
# The training loop.
# ------------------------------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: Path, *, progress: bool = True) -> np.ndarray:
    """Trains the token rows; resumes from `workdir/checkpoints` if present. Returns the final rows."""
    check_config(config)
    workdir = Path(workdir)
    sf = config.styleforge if config.method == "styleforge" else None
    dataset = None if sf else load_training_data(config)  # StyleForge reads its folders once the model is loaded
    dtype = jnp.dtype(config.train.get("dtype", "float32"))
    kind = config.get("trainable", "embeddings")
    # Trained weights keep float32 master copies whatever the compute dtype (train.dtype).
    pipe = load_pipeline(config.model, dtype=dtype, param_dtype=jnp.float32 if kind == "full" else None)
    table = np.asarray(pipe.text_encoder.embeddings.token_embedding.embedding[...], np.float32)
    if len(pipe.tokenizer) != len(table):
        raise UserError(f"{config.model}: tokenizer has {len(pipe.tokenizer)} tokens, the text encoder "
                        f"{len(table)} embedding rows")
    if kind == "embeddings":
        initial = starting_rows(config, table, pipe.tokenizer)
        add_learned_words(pipe.tokenizer, config)
    dreamartist = DreamArtistSpec.from_config(config) if config.method == "dreamartist" else None
    reconstruction = bool(dreamartist and dreamartist.reconstruction_weight)
    if sf:
        data = prepare_concepts(pipe, config, workdir, progress)
    else:
        data = prepare_data(pipe, dataset, config.placeholder_token,
                            negative_word=learned_words(config)[1][1] if dreamartist else None,
                            keep_images=reconstruction)
    workdir.mkdir(parents=True, exist_ok=True)  # only after the data and the model passed their checks
    flip = config.data.get("flip", True)

    # --- mesh, frozen state and the jitted step ---
    mesh_config = config.get("mesh", ml_collections.ConfigDict())
    mesh = distributed.make_mesh(mesh_config.get("data", -1), mesh_config.get("fsdp", 1))
    accum = config.train.grad_accum_steps
    if config.train.batch_size % (accum * distributed.batch_size_of(mesh)):
        raise UserError(f"config train.batch_size={config.train.batch_size} must be a multiple of the "
                        f"{distributed.batch_size_of(mesh)} devices of the mesh times train.grad_accum_steps={accum}")
    whole = distributed.replicated(mesh)
    batch_sharding = distributed.batch_sharded(mesh, batch_axis=1)  # batch arrays are (groups, batch, ...)
    graphdefs, frozen, trained = split_models(pipe, config, ("text_encoder", "unet") + (("vae",) if reconstruction
                                                                                      else ()))
    frozen_sharding = distributed.frozen_shardings(mesh, frozen, mesh_config.get("shard_frozen_weights", False))
    frozen = distributed.put_tree(frozen, frozen_sharding)
    schedule = NoiseSchedule.from_config(pipe.scheduler_config, pipe.folder / "scheduler" / "scheduler_config.json")
    max_timestep = config.train.get("max_timestep", 0)
    if max_timestep > schedule.num_train_timesteps:
        raise UserError(f"config train.max_timestep={max_timestep} is above the model's "
                        f"{schedule.num_train_timesteps} training timesteps")
    spec = StepSpec(graphdefs=graphdefs, schedule=schedule, scaling_factor=pipe.vae.config.scaling_factor,
                    compute_dtype=dtype, clip_skip=config.get("clip_skip", 0),
                    remat=config.train.get("remat", False), max_timestep=max_timestep)
    tx = make_optimizer(config)
    if kind == "embeddings":  # the token rows and their optimizer state are small: replicated
        rows = distributed.put(initial, whole, copy=True)
        trained_sharding = opt_sharding = whole
    else:
        # Full weights, their gradients and optimizer state are split over fsdp like frozen weights (a
        # replicated copy when mesh.fsdp is 1); LoRA adapters are small and replicated.
        full = kind == "full"
        trained_sharding = distributed.frozen_shardings(mesh, trained, full)
        opt_sharding = distributed.frozen_shardings(mesh, jax.eval_shape(tx.init, trained), full)
        rows = distributed.put_tree(trained, trained_sharding, copy=True)  # donated: not the modules' arrays
    step_fn = jax.jit(make_train_step(spec, tx, config.method, config.nsync.get("share_noise", False),
                                      skip_nonfinite=config.train.get("nonfinite", "stop") == "skip",
                                      dreamartist=dreamartist,
                                      prior_loss_weight=sf.prior_loss_weight if sf else 1.0,
                                      grad_accum_steps=accum, nsync_variant=config.nsync.variant),
                      in_shardings=(trained_sharding, opt_sharding, frozen_sharding, batch_sharding, whole),
                      out_shardings=(trained_sharding, opt_sharding, whole), donate_argnums=(0, 1))
    init_opt_state = jax.jit(tx.init, out_shardings=opt_sharding)
    opt_state = init_opt_state(rows)
    # A sequential Multi-StyleForge run starts each concept with a fresh optimizer state.
    restarts = styleforge.optimizer_restarts(config.train.steps, len(data), sf.schedule) if sf else set()

    # --- resume ---
    manager = checkpoint_manager(workdir, keep=config.checkpoint.get("keep", 3))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        saved_as = trained_key(rows)
        restored, _ = restore_checkpoint(manager, start, {saved_as: rows, "opt_state": opt_state})
        rows, opt_state = restored[saved_as], restored["opt_state"]

    # --- loop ---
    key = jax.random.key(config.train.seed)
    main = distributed.is_main_process()  # only process 0 writes metrics and exports; checkpoints are collective
    metrics_log = outputs.MetricsLog(workdir, enabled=main)
    sample_every = config.train.get("sample_every_steps", 0)
    if sample_every:
        sample = config.sample
        sample_prompts = (data[0].style_prompts if sf else
                          training_prompts(dataset, config.placeholder_token))[:sample.count]
        # DreamArtist draws with its negative word as the negative prompt, as it is meant to be used.
        sample_negative = learned_words(config)[1][1] if dreamartist else ""
        # Weights trained below train.max_timestep are previewed as they will be sampled: the base model (a copy
        # taken before any step) draws the timesteps above it. Token rows need no copy: the base is the same model.
        handoff = max_timestep if kind != "embeddings" else 0
        preview_base = (dataclasses.replace(pipe, text_encoder=nnx.clone(pipe.text_encoder),
                                            unet=nnx.clone(pipe.unet)) if handoff else None)
        sample_settings = SampleSettings(scheduler=sample.scheduler, steps=sample.steps, guidance=sample.guidance,
                                         height=config.data.resolution, width=config.data.resolution,
                                         clip_skip=config.get("clip_skip", 0), batch_size=len(sample_prompts),
                                         handoff_timestep=handoff)
    bar = tqdm(total=config.train.steps, initial=start, unit="step", disable=not (progress and main))
    last_time, last_step = time.perf_counter(), start
    with stop_on_sigterm() as stop_requested:
        try:
            for step in range(start, config.train.steps):
                if sf:
                    batch = styleforge.step_batch(data, sf.schedule, config.train.steps, config.train.batch_size,
                                                  config.train.seed, step, flip)
                else:
                    batch = step_batch(data, config.method, config.train.batch_size, config.train.seed, step, flip)
                if step in restarts:
                    opt_state = init_opt_state(rows)
                batch = {k: distributed.put(v, batch_sharding) for k, v in batch.items()}
                if step == start:
                    step_fn = distributed.compile_together(step_fn, rows, opt_state, frozen, batch, key,
                                                           name="train_step")
                new_rows, new_opt_state, metrics = step_fn(rows, opt_state, frozen, batch,
                                                           jax.random.fold_in(key, step))
                metrics = {k: float(distributed.to_host(v)) for k, v in metrics.items()}
                finite = all(np.isfinite(v) for v in metrics.values())
                if not finite and config.train.get("nonfinite", "stop") == "stop":
                    raise UserError(f"non-finite loss or gradient at step {step + 1} ({metrics}); the last good "
                                    f"checkpoint is step {manager.latest_step()} (train.nonfinite=skip skips such "
                                    "steps instead)")
                rows, opt_state = new_rows, new_opt_state  # a non-finite step left them unchanged (skip_nonfinite)
                metrics["skipped"] = int(not finite)
                done = step + 1
                bar.update(1)
                if done % config.train.get("log_every_steps", 10) == 0 or done == config.train.steps:
                    now = time.perf_counter()
                    metrics.update(step=done, steps_per_sec=(done - last_step) / (now - last_time))
                    last_time, last_step = now, done
                    metrics_log.write(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if sample_every and done % sample_every == 0:
                    show_trained(pipe, rows, kind)
                    outputs.write_sample_grid(workdir / "samples" / f"step_{done:06d}.png" if main else None, pipe,
                                              sample_prompts, sample_settings, sample.seed, sample_negative,
                                              base=preview_base)
                stopping = distributed.any_process(bool(stop_requested))
                if done % config.checkpoint.every_steps == 0 or done == config.train.steps or stopping:
                    save_checkpoint(manager, done, {trained_key(rows): rows, "opt_state": opt_state},
                                    {"step": done, "config": config.to_dict()})
                if stopping:
                    stop_requested.append(True)
                    break
        finally:
            manager.wait_until_finished()
            metrics_log.close()
            bar.close()

    if stop_requested:
        raise UserError(f"stopped by SIGTERM after step {manager.latest_step()}; the checkpoint is saved in "
                        f"{workdir / 'checkpoints'}: run the same command again to resume")
    if kind != "embeddings":
        final = jax.tree.map(lambda x: distributed.gather_to_host(x).astype(np.float32), rows)
        if main and kind == "lora":
            lora.write_lora_file(workdir / "lora.safetensors", final, lora_scale(config),
                                 metadata=export_metadata(config, config.train.steps))
        return final
    final_rows = distributed.to_host(rows).astype(np.float32)
    if main:
        export_words(workdir / "learned_embeds.safetensors", config, final_rows, config.train.steps)
    return final_rows


def show_trained(pipe: StableDiffusion, trained, kind: str) -> None:
    """Puts what is trained so far into the pipeline that draws the sample grids: the token rows, or the LoRA
    or full weights (host copies: the step donates its own buffers)."""
    if kind == "embeddings":
        pipe.extra_token_rows = distributed.to_host(trained).astype(np.float32)
        return
    for name, flat in trained.items():
        nnx.update(pipe.modules()[name], lora.nested_params(
            {path: jnp.asarray(distributed.gather_to_host(x)) for path, x in flat.items()}))


def lora_scale(config) -> float:
    return float(config.lora.alpha) / config.lora.rank


def split_models(pipe: StableDiffusion, config, names) -> tuple[dict, dict, dict | None]:
    """Each module's graphdef and frozen state, and what is trained of them (None for token embeddings).

    The parameter filter is the config's choice: `nnx.LoRAParam` after `lora.add_lora` put adapters on the
    targeted layers (`trainable=lora`), every `nnx.Param` of the UNet and optionally of the text encoder
    (`trainable=full`). Trained parts come as flat dicts `{component: {path: array}}` (`lora.flat_params`);
    the VAE is always frozen.
    """
    kind = config.get("trainable", "embeddings")
    trained_names = ()
    if kind == "lora":
        trained_names = ("unet",) + (("text_encoder",) if config.lora.get("text_encoder", False) else ())
    elif kind == "full":
        trained_names = ("unet",) + (("text_encoder",) if config.full.get("train_text_encoder", True) else ())
    # Adapter initialisation has its own stream, apart from the steps' fold_in(key(seed), step).
    lora_key = jax.random.fold_in(jax.random.key(config.train.seed), 0x4C6F5241)
    graphdefs, frozen, trained = {}, {}, {}
    for index, name in enumerate(names):
        module = pipe.modules()[name]
        if name not in trained_names:
            graphdefs[name], frozen[name] = nnx.split(module)
            continue
        selected = nnx.Param
        if kind == "lora":
            targets = tuple(config.lora.targets) if name == "unet" else lora.TEXT_ENCODER_TARGETS
            lora.add_lora(module, targets, rank=config.lora.rank, alpha=config.lora.alpha,
                          key=jax.random.fold_in(lora_key, index))
            selected = nnx.LoRAParam
        graphdefs[name], trained_state, frozen[name] = nnx.split(module, selected, ...)
        trained[name] = lora.flat_params(trained_state)
    return graphdefs, frozen, (trained or None)
