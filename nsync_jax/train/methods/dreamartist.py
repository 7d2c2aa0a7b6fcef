"""DreamArtist: a positive word and a negative word `<token>-neg`, their predictions fused as classifier-free
guidance does, eps_n + gamma(t) (eps_p - eps_n), and the denoising loss (and optionally a pixel L1 through the
frozen VAE decoder) taken on the fused prediction, so one gradient reaches both words: the positive's through
gamma, the negative's through (1 - gamma). Both words are rows of one trained matrix (the positive's first);
the optimizer treats each as the separate torch parameter it is in the released code (`configs/dreamartist_*.py`
hold the released settings).

On Stable Diffusion XL (no released code; as the released SDXL Textual Inversion script trains a word) both words
have rows in both text encoders (`trainables.SDXLEmbeddings`), each word of each encoder its own parameter to
the optimizer (clipped, scaled and averaged on its own); each word is written as a clip_l/clip_g file, the
negative one as `<name>-neg.safetensors`, its token `<name>-neg` at sampling.

DreamArtist++ (`trainable="lora"`, HCP-Diffusion's `cfgs/train/examples/DreamArtist++.yaml` and
`doc/guide_DA.md`; `configs/dreamartist_plus_sd15.py`): the two words, plus LoRA adapters of each branch on
the same layers, the negative prompts' UNet and text encoder running with the negative adapters and the
positive prompts' with the positive ones (HCP applies each set to its half of the batch), fused and trained
as above; each branch's UNet and text encoder adapters have their own learning rate
(`dreamartist.lora_learning_rate`, `neg_lora_learning_rate`, `text_encoder_lora_learning_rate`). Files: the
words as embeddings, the positive adapters as `lora.safetensors` and the negative ones as
`lora-neg.safetensors`. HCP's guide samples with the positive word and LoRA on the positive branch and the
negative LoRA alone on the negative one (`sample --negative-lora`). Where this differs from HCP's config: no
LoRA dropout (HCP: 0.1); one weight decay (`train.weight_decay`; HCP: 1e-3 adapters, 5e-4 words); a constant
learning rate (HCP: one-cycle with 200 warm-up steps); no regularisation set of the model's own images. All
adapters' gradients are clipped together to `dreamartist.grad_clip_norm`, as HCP's max_grad_norm 1.0; its
min-SNR weighting of the loss is `dreamartist.min_snr_gamma` (HCP's formula for eps-prediction, applied to
v-prediction models too).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nsync_jax import tokens
from nsync_jax.errors import UserError
from nsync_jax.optim import clip_row_blocks, ema_reset, scale_row_blocks
from nsync_jax.schedulers import predicted_original
from nsync_jax.train import data as train_data
from nsync_jax.train.methods.base import Method, Word
from nsync_jax.train.step import StepSpec, conditioning, denoise, group_keys

# gamma(t) = lo + (hi - lo) r(t / (T - 1)), as the released extension's dynamic CFG.
GUIDANCE_SCHEDULES = ("constant", "ln", "cos", "cos2")
# The negative word is `<token>-neg` in prompts and `<name>-neg.pt` on disk, as released.
NEGATIVE_SUFFIX = "-neg"
# DreamArtist++'s adapters per branch, in the order of a step's groups (the negative prompts first); the
# negative's files take the negative word's suffix.
LORA_BRANCHES = (("negative", NEGATIVE_SUFFIX), ("positive", ""))


@dataclasses.dataclass(frozen=True)
class DreamArtistSpec:
    """What DreamArtist's step needs to know statically (from `config.dreamartist`)."""

    num_positive_vectors: int  # the first rows are the positive word's, the rest the negative word's
    guidance: float  # gamma, or gamma at t = T - 1 with a schedule
    guidance_schedule: str = "constant"
    guidance_min: float | None = None  # gamma at t = 0 with a schedule
    reconstruction_weight: float = 0.0  # 0: no pixel reconstruction term
    min_snr_gamma: float = 0.0  # 0: no min-SNR weighting

    @classmethod
    def from_config(cls, config) -> DreamArtistSpec:
        da = config.dreamartist
        return cls(num_positive_vectors=config.num_vectors, guidance=da.guidance,
                   guidance_schedule=da.guidance_schedule, guidance_min=da.guidance_min,
                   reconstruction_weight=da.reconstruction_weight if da.reconstruction else 0.0,
                   min_snr_gamma=da.min_snr_gamma)


def fusion_guidance(da: DreamArtistSpec, t: jax.Array, num_train_timesteps: int) -> jax.Array:
    """gamma(t) `(batch,)` float32: constant, or guidance_min + (guidance - guidance_min) r(t / (T - 1)), rising
    with the noise level."""
    if da.guidance_schedule == "constant":
        return jnp.full(t.shape, da.guidance, jnp.float32)
    rho = t.astype(jnp.float32) / (num_train_timesteps - 1)
    ramp = {"ln": lambda: rho, "cos": lambda: jnp.cos((rho - 1) * jnp.pi / 2),
            "cos2": lambda: 1 - jnp.cos(rho * jnp.pi / 2)}[da.guidance_schedule]()
    return da.guidance_min + (da.guidance - da.guidance_min) * ramp


def dreamartist_losses(spec: StepSpec, da: DreamArtistSpec, trained, frozen, batch, key):
    """DreamArtist's loss and its parts `{"loss_denoise", "loss_reconstruction"}` for one step.

    Args:
      trained: the rows `(num_positive_vectors + num_negative_vectors, width)`, the positive word's then the
        negative's (on SDXL such rows per text encoder, `{"text_encoder": ..., "text_encoder_2": ...}`); with
        trainable lora, `{"rows": rows, "negative": adapters, "positive": adapters}`.
      batch: ids `(2, batch, tokens)`, the negative word's prompts then the positive word's (as released);
        mean, logvar `(1, batch, h, w, c)`; with reconstruction, pixels `(1, batch, H, W, 3)` in [-1, 1]; with
        attention masks, weights `(1, batch, h, w)` of the squared error; on SDXL each image's `time_ids`
        `(1, batch, 6)`.
    """
    # Both groups read the same posteriors with the same key: the two words see the same noisy latents and
    # timesteps; the UNet runs once on the batch of both (with LoRA, each group with its branch's adapters).
    both = lambda x: jnp.broadcast_to(x, (2, *x.shape[1:]))
    prediction, target, noisy, t = denoise(spec, spec.trainable.branch_params(trained, 2), frozen, batch["ids"],
                                           both(batch["mean"]), both(batch["logvar"]),
                                           group_keys(key, 2, share_noise=True),
                                           extras=jax.tree.map(both, conditioning(batch)))
    negative, positive = prediction[0], prediction[1]
    gamma = fusion_guidance(da, t[1], spec.schedule.num_train_timesteps)[:, None, None, None]
    fused = negative + gamma * (positive - negative)
    # In the model's own parameterisation (v for v-prediction models), as the other methods' loss: fusing v is
    # fusing eps (the two are affine in each other at fixed x_t), and the v loss is the eps loss / abar_t.
    squared = jnp.square(fused - target[1])
    if "weights" in batch:  # attention masks, per latent pixel
        squared = squared * batch["weights"][0][..., None]
    if da.min_snr_gamma:  # HCP-Diffusion's MinSNRLoss: min(gamma / SNR(t), 1) per example
        abar = jnp.asarray(spec.schedule.alphas_cumprod)[t[1]]
        squared = squared * jnp.minimum(da.min_snr_gamma * (1 - abar) / abar, 1.0)[:, None, None, None]
    parts = {"loss_denoise": jnp.mean(squared)}
    loss = parts["loss_denoise"]
    if da.reconstruction_weight:
        vae = nnx.merge(spec.graphdefs["vae"], frozen["vae"])
        latents = predicted_original(spec.schedule, noisy[1], fused, t[1]) / spec.scaling_factor
        images = vae.decode(latents.astype(spec.compute_dtype), remat=True).astype(jnp.float32)
        parts["loss_reconstruction"] = jnp.mean(jnp.abs(images - batch["pixels"][0]))
        loss = loss + da.reconstruction_weight * parts["loss_reconstruction"]
    return loss, parts


def dreamartist_gradients(spec: StepSpec, da: DreamArtistSpec, trained, frozen, batch, key):
    """The gradient of DreamArtist's loss on what is trained, no extra optimizer arguments, and metrics."""
    (loss, parts), grads = jax.value_and_grad(dreamartist_losses, argnums=2, has_aux=True)(
        spec, da, trained, frozen, batch, key)
    with_adapters = spec.trainable.trains_modules  # trainable lora: {"rows", "negative", "positive"}
    rows = grads["rows"] if with_adapters else grads
    positive, negative = (jax.tree.map(lambda x: x[part], rows)  # SDXL: both encoders' rows of the word
                          for part in (slice(None, da.num_positive_vectors), slice(da.num_positive_vectors, None)))
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(positive),
               "negative_grad_norm": optax.tree.norm(negative)}
    if with_adapters:
        metrics.update({f"{branch}_lora_grad_norm": optax.tree.norm(grads[branch]) for branch, _ in LORA_BRANCHES})
    return grads, {}, metrics


class DreamArtist(Method):
    name = "dreamartist"
    token_rows_only = True  # its negative word is learned token rows
    lora_branches = LORA_BRANCHES  # trainable lora: DreamArtist++
    supports_sdxl = True

    def check_config(self, config):
        da = config.dreamartist
        for key in ("num_negative_vectors", "ema_rep_step", "neg_ema_rep_step"):
            if not isinstance(da[key], int) or da[key] < 1:
                raise UserError(f"config dreamartist.{key}={da[key]!r} must be a positive integer")
        if da.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise UserError(f"config dreamartist.guidance_schedule={da.guidance_schedule!r} must be one of "
                            f"{', '.join(GUIDANCE_SCHEDULES)}")
        scheduled = da.guidance_schedule != "constant"
        if scheduled != (da.guidance_min is not None):
            raise UserError(f"config dreamartist.guidance_min={da.guidance_min!r}: set it (gamma at t = 0) exactly "
                            f"when dreamartist.guidance_schedule is not 'constant' (it is {da.guidance_schedule!r})")
        for key in ("ema_weight", "neg_ema_weight"):
            if not 0.0 < da[key] <= 1.0:
                raise UserError(f"config dreamartist.{key}={da[key]!r} must be in (0, 1] (1: no EMA)")
        if not da.grad_clip_norm > 0:
            raise UserError(f"config dreamartist.grad_clip_norm={da.grad_clip_norm!r} must be positive")
        for key in ("neg_lr_weight", "negative_init_std"):
            if da[key] < 0:
                raise UserError(f"config dreamartist.{key}={da[key]!r} must not be negative")
        if da.min_snr_gamma < 0:
            raise UserError(f"config dreamartist.min_snr_gamma={da.min_snr_gamma!r} must not be negative (0: off)")
        if da.reconstruction and not da.reconstruction_weight > 0:
            raise UserError(f"config dreamartist.reconstruction_weight={da.reconstruction_weight!r} must be "
                            "positive with dreamartist.reconstruction=True")
        # The negative of DreamArtist is a learned word, not an image set; one embedding file holds one word.
        if config.data.negatives:
            raise UserError(f"config data.negatives={config.data.negatives!r} is not used by method dreamartist "
                            "(its negative is the learned word <token>-neg): leave it empty")
        if config.train.weight_decay_scope != "rows":
            raise UserError("config train.weight_decay_scope='table' is not supported with method dreamartist (its "
                            "words are parameters of their own in the released code, not rows of the table)")
        if config.initializer_embedding:
            raise UserError("config initializer_embedding is not supported with method dreamartist (it starts both "
                            "words from initializer_token)")
        for key in ("lora_learning_rate", "neg_lora_learning_rate", "text_encoder_lora_learning_rate"):
            if not da[key] > 0:
                raise UserError(f"config dreamartist.{key}={da[key]!r} must be positive")

    def words(self, config):
        return [*super().words(config), Word(NEGATIVE_SUFFIX, config.placeholder_token + NEGATIVE_SUFFIX,
                                             config.dreamartist.num_negative_vectors)]

    def initial_rows(self, config, table, tokenizer):
        """Both words from the initializer word's row, the negative's plus small noise."""
        positive, negative = (word.count for word in self.words(config))
        rows = tokens.initial_rows(table, tokenizer, config.initializer_token, positive + negative)
        noise = np.random.default_rng(config.train.seed).normal(0.0, config.dreamartist.negative_init_std,
                                                                rows[positive:].shape)
        rows[positive:] += noise.astype(np.float32)
        return rows

    def frozen_modules(self, config):
        return super().frozen_modules(config) + (("vae",) if config.dreamartist.reconstruction else ())

    def read_data(self, config):
        return train_data.read_style_dataset(config, masks=config.dreamartist.attention_masks)

    def prepare(self, pipe, dataset, config, workdir, progress):
        prepared = train_data.prepare(pipe, dataset, config, config.placeholder_token,
                                      negative_word=self.negative_word(config),
                                      keep_images=config.dreamartist.reconstruction)
        return train_data.TrainingData(functools.partial(self.batch, prepared, config), prepared.prompts)

    def batch(self, prepared, config, step):
        """The positives' prompts with the negative word, then with the token (as released), on the same
        latents; with reconstruction their pixels, with attention masks their loss weights."""
        draw = train_data.draw_examples(prepared, config.train.batch_size, config.train.seed, step,
                                        contrastive=False, flip=config.data.flip)
        batch = train_data.style_batch(prepared, draw)
        prompt = draw.index if prepared.captioned else draw.template
        batch["ids"] = np.stack([prepared.negative_word_ids[prompt], prepared.ids[prompt]])
        if prepared.images is not None:
            batch["pixels"] = np.stack([prepared.images[i][:, ::-1] if mirrored else prepared.images[i]
                                        for i, mirrored in zip(draw.index, draw.flips[0])])[None]
        if prepared.loss_weights is not None:
            batch["weights"] = prepared.loss_weights[draw.index, draw.flips[0]][None]
        return batch

    def gradients(self, spec, config):
        da = DreamArtistSpec.from_config(config)
        return lambda rows, frozen, batch, key: dreamartist_gradients(spec, da, rows, frozen, batch, key)

    def optimizer(self, config, adamw):
        da, sizes = config.dreamartist, tuple(word.count for word in self.words(config))
        # Each word is its own torch parameter in the released code: clipped alone, with its own learning rate.
        chain = [clip_row_blocks(sizes, da.grad_clip_norm), adamw, scale_row_blocks(sizes, (1.0, da.neg_lr_weight))]
        if da.ema_weight < 1 or da.neg_ema_weight < 1:  # each word's EMA on its own, as released
            chain.append(ema_reset((da.ema_weight, da.neg_ema_weight), (da.ema_rep_step, da.neg_ema_rep_step),
                                   block_sizes=sizes))
        if config.trainable != "lora":
            return optax.chain(*chain)
        # DreamArtist++: every adapter's gradient clipped together (HCP clips the model's trainable parameters
        # as one), then each branch's adapters of each component with their own learning rate, as AdamW's update
        # scaled by rate / train.learning_rate (weight decay included, as a torch parameter group's lr).
        rates = {"positive/unet": da.lora_learning_rate, "negative/unet": da.neg_lora_learning_rate}
        if config.lora.text_encoder:
            rates.update({"positive/text_encoder": da.text_encoder_lora_learning_rate,
                          "negative/text_encoder": da.text_encoder_lora_learning_rate})
        transforms = {"words": optax.chain(*chain)}
        for label, rate in rates.items():
            transforms[label] = optax.chain(adamw, optax.scale(rate / config.train.learning_rate))
        labels = lambda trained: {part: "words" if part == "rows" else {c: f"{part}/{c}" for c in trained[part]}
                                  for part in trained}
        adapters = lambda trained: {part: part != "rows" for part in trained}
        return optax.chain(optax.masked(optax.clip_by_global_norm(da.grad_clip_norm), adapters),
                           optax.multi_transform(transforms, labels))

    def metadata(self, config):  # the training gamma is the CFG scale to start sampling from
        return {"negative_token": self.negative_word(config), "guidance": config.dreamartist.guidance}

    def preview_negative_prompt(self, config):  # drawn with its negative word, as it is meant to be used
        return self.negative_word(config)

    @staticmethod
    def negative_word(config) -> str:
        return config.placeholder_token + NEGATIVE_SUFFIX
