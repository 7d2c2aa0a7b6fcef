"""Every training setting and its default, and the checks that run before any file is read.

`default_config()` is the only source of defaults: experiment files in configs/ start from it and change what
they need, and the code reads `config.a.b` without fallbacks. Which method and trainable a run uses are looked
up by name in their registries (`methods`, `trainables`), and each checks its own section.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from nsync_jax.errors import UserError
from nsync_jax.train import methods, trainables


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ""  # a diffusers Stable Diffusion folder, a Hugging Face Hub id (org/name) or a single file
    config.model_revision = ""  # of a Hub id: a branch, tag or commit ("": main)
    config.model_variant = ""  # weight files of this variant, e.g. "fp16" (*.fp16.safetensors); "": the plain ones
    # A single-file checkpoint's configs, when not those of its detected standard architecture: a diffusers folder,
    # a Hub id, or sd1, sd2-base, sd2-v
    config.model_config = ""
    # Another model's VAE in place of the model's own ("": the model's): a diffusers VAE folder, a model folder
    # with vae/, or a Hub id such as stabilityai/sd-vae-ft-mse (StyleForge's released scripts use that one).
    config.vae = ""
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
    # >0: each layer's rank is this fraction of its output width (at least 1), in place of lora.rank
    # (HCP-Diffusion's relative ranks, as its DreamArtist++ config uses).
    config.lora.relative_rank = 0.0
    config.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")  # UNet linear layers (path suffixes)
    config.lora.text_encoder = False  # also adapt the text encoder's lora.text_encoder_targets
    config.lora.text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj")  # its layers (path suffixes)
    config.lora.text_encoder_rank = 0  # >0: the text encoder's rank (0: the UNet's, lora.rank or relative_rank)
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
    # "squash" as the released code (SDXL: time_ids (res, res, 0, 0, res, res), as the released SDXL scripts), or
    # "center_crop", "random_crop" (StyleForge): on SDXL each cropped image's original size and crop top-left in its
    # short-side resize enter its own time_ids, as diffusers' SDXL training scripts record them.
    config.data.resize = "squash"
    config.data.flip = True  # each example mirrored at random (NSYNC); the released DreamArtist and StyleForge do not
    # "per_step": a fresh latent from each image's cached VAE posterior at every step; "once": one draw per image,
    # kept for the run (the released DreamArtist).
    config.data.latent_sample = "per_step"
    config.data.aux_images = ""  # StyleForge's Aux images (bound to styleforge.class_prompt) ...
    config.data.aux_captions = ""  # ... and their captions (optional)
    config.data.skip_bad_items = False

    config.train = ml_collections.ConfigDict()
    config.train.steps = 8000
    config.train.batch_size = 2  # NSYNC: triples (positive, negative, anchor) per step
    config.train.learning_rate = 5e-4
    config.train.scale_lr = True  # multiply by the batch size, as the released code
    config.train.weight_decay = 1e-2  # torch's AdamW default
    # What the weight decay shrinks: "rows" (the token rows only) or "table" (every row of the embedding table, as
    # the released NSYNC and Textual Inversion scripts' AdamW over the whole table does).
    config.train.weight_decay_scope = "rows"
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
    # The paper's rule; optim.VARIANTS lists the others, "released" being what the released code's default
    # (v4.2) computes.
    config.nsync.variant = "orthogonal_anchor"
    config.nsync.granularity = "global"
    config.nsync.share_noise = False  # positive and its negative draw the same latent noise and timestep
    # The negatives' prompts: "in_style" (the positives' prompts) or "not_in_style" ("<caption> not in the style
    # of <token>", as the released v5.x configurations).
    config.nsync.negative_prompt = "in_style"

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
    config.dreamartist.ema_weight = 1.0  # < 1: keep an EMA of the positive word's rows (this decay) ...
    config.dreamartist.ema_rep_step = 25  # ... and copy it into them every this many steps
    config.dreamartist.neg_ema_weight = 1.0  # the same for the negative word, on its own (as released)
    config.dreamartist.neg_ema_rep_step = 25
    # `<stem>_att.<ext>` next to an image in data.images is its attention mask (not a training image): grey
    # levels weight the denoising loss per latent pixel, 0 -> 0, 127 -> 1, 255 -> 5 (the released mapping).
    config.dreamartist.attention_masks = False
    # DreamArtist++ (trainable="lora"): each branch of the fusion has its own adapters, with these learning rates
    # (the words keep train.learning_rate).
    config.dreamartist.lora_learning_rate = 1e-4  # the positive branch's UNet adapters
    config.dreamartist.neg_lora_learning_rate = 4e-5  # the negative branch's ("prevents image collapse", as released)
    config.dreamartist.text_encoder_lora_learning_rate = 2e-5  # both branches' text encoder adapters
    # >0: each example's squared error weighted by min(gamma / SNR(t), 1), HCP-Diffusion's MinSNRLoss (2 in its
    # DreamArtist++ config); 0: unweighted, as the DreamArtist extension.
    config.dreamartist.min_snr_gamma = 0.0

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
    # in place of data.images and the prompts above; "mixed": each epoch one shuffled pass over every concept's
    # (StyleRef, Aux) batches, as released; "joint": concepts take turns step by step; "staged": one after the
    # other in the order of their names (nsync_jax/train/methods/styleforge.py).
    config.styleforge.concepts = ml_collections.ConfigDict()
    config.styleforge.schedule = "mixed"

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3

    # The device mesh (all devices of all processes): the global batch is split over data x fsdp.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: every device not used by the other axis
    config.mesh.fsdp = 1
    config.mesh.shard_frozen_weights = False  # True: split the frozen UNet and text encoder over fsdp
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first key that is missing or invalid."""
    missing = _first_missing(default_config(), config)
    if missing:
        raise UserError(f"config key {missing} is missing (experiment files start from "
                        "nsync_jax.train.config.default_config())")
    method = methods.get(config.method)
    trainable = trainables.get(config.trainable)
    if config.train.weight_decay_scope not in ("rows", "table"):
        raise UserError(f"config train.weight_decay_scope={config.train.weight_decay_scope!r} must be 'rows' or "
                        "'table'")
    if config.data.latent_sample not in ("per_step", "once"):
        raise UserError(f"config data.latent_sample={config.data.latent_sample!r} must be 'per_step' or 'once'")
    if config.train.nonfinite not in ("stop", "skip"):
        raise UserError(f"config train.nonfinite={config.train.nonfinite!r} must be 'stop' or 'skip'")
    for key in ("num_vectors", "train.steps", "train.batch_size", "checkpoint.every_steps", "data.resolution",
                "train.grad_accum_steps"):
        value = lookup(config, key)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"config {key}={value!r} must be a positive integer")
    max_timestep = config.train.max_timestep
    if not isinstance(max_timestep, int) or max_timestep < 0:
        raise UserError(f"config train.max_timestep={max_timestep!r} must be a non-negative integer (0: all)")
    method.check_config(config)
    trainable.check_config(config, method)


def lookup(config: ml_collections.ConfigDict, key: str) -> Any:
    """`config.a.b` for key "a.b"."""
    for part in key.split("."):
        config = config[part]
    return config


def _first_missing(defaults: ml_collections.ConfigDict, config, prefix: str = "") -> str | None:
    """The first key of `defaults` that `config` lacks (dict-valued sections whose keys are the user's, such as
    styleforge.concepts, are not looked into)."""
    for key, value in defaults.items():
        if not isinstance(config, ml_collections.ConfigDict) or key not in config:
            return prefix + key
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            missing = _first_missing(value, config[key], f"{prefix}{key}.")
            if missing:
                return missing
    return None


def with_defaults(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config recorded in a checkpoint, over today's defaults (keys added since it was written)."""
    def merge(defaults: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        merged = dict(defaults)
        for key, value in values.items():
            both_sections = isinstance(value, dict) and isinstance(defaults.get(key), dict) and defaults[key]
            merged[key] = merge(defaults[key], value) if both_sections else value
        return merged

    return ml_collections.ConfigDict(merge(default_config().to_dict(), saved))
