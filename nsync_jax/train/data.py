"""A style dataset made ready for training, and the examples of each step (a function of seed and step).

`TrainingData` is what a method hands the trainer: the batch of any step (numpy, groups first:
`(groups, batch, ...)`), the prompts of the preview grids, and the steps at which the optimizer starts afresh.
Textual Inversion, NSYNC and DreamArtist read one style dataset (`read_style_dataset`, `prepare`,
`draw_examples`); StyleForge reads its concepts (`methods/styleforge.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from nsync_jax.data import tfds_style
from nsync_jax.data.latent_cache import mirrored_moments, sampled_once
from nsync_jax.data.style_dataset import StyleDataset, build_style_dataset, find_style_items, mask_weights
from nsync_jax.errors import UserError
from nsync_jax.sdxl import StableDiffusionXL, image_time_ids

# Prompts for images without captions (Textual Inversion's style templates).
STYLE_TEMPLATES = ("a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
                   "a cropped painting in the style of {}", "a good painting in the style of {}",
                   "a close-up painting in the style of {}", "a nice painting in the style of {}")


@dataclasses.dataclass(frozen=True)
class TrainingData:
    batch: Callable[[int], dict[str, np.ndarray]]  # the examples of a step
    preview_prompts: list[str]  # the sample grids draw the first `sample.count` of these
    optimizer_restarts: frozenset[int] = frozenset()  # steps that start with a fresh optimizer state


@dataclasses.dataclass
class PreparedData:
    ids: np.ndarray  # (N or templates, tokens) int32 prompt ids for each positive (captioned) or template;
    # SDXL: (N or templates, 2, tokens), each tokenizer's
    positives: np.ndarray  # (N, 2, h, w, 2c) posterior moments of each image and its mirror image
    negatives: np.ndarray | None
    captioned: bool
    prompts: list[str]  # the prompts of `ids`
    negative_ids: np.ndarray | None = None  # NSYNC: the negatives' own prompt ids, when they differ from `ids`
    negative_word_ids: np.ndarray | None = None  # DreamArtist: `ids` with the negative word for the token
    loss_weights: np.ndarray | None = None  # DreamArtist's attention masks: (N, 2, h, w), the mirror second
    images: np.ndarray | None = None  # (N, H, W, 3) in [-1, 1], for DreamArtist's pixel reconstruction
    # SDXL: the micro-conditioning (N, 2, 6) of each positive and its mirror image, indexed as `positives`
    # (`image_time_ids`); None on SD 1.x/2.x, whose UNet has none.
    time_ids: np.ndarray | None = None
    negative_time_ids: np.ndarray | None = None  # the same for the negatives


def read_style_dataset(config: ml_collections.ConfigDict, *, masks: bool = False,
                       needs_negatives: str = "") -> StyleDataset:
    """The validated style dataset: from folders (`data.images`, ...) or a prepared tfds dataset. `masks`:
    read attention masks next to the images; `needs_negatives`: the method that needs negatives (an error
    names it when a prepared dataset has none)."""
    data = config.data
    if data.prepared:
        if masks:
            raise UserError("config dreamartist.attention_masks needs data.images (prepared datasets hold no masks)")
        items = tfds_style.read(data.prepared, data.split)
        if needs_negatives and items[0].negative is None:
            raise UserError(f"{data.prepared}: the prepared dataset has no negatives, which method "
                            f"{needs_negatives} needs")
    else:
        items = find_style_items(data.images, captions=data.captions or None, negatives=data.negatives or None,
                                 skip_bad_items=data.skip_bad_items, masks=masks)
    return build_style_dataset(items, data.resolution, data.resize, config.train.seed)


def training_prompts(dataset: StyleDataset, word: str, negated: bool = False) -> list[str]:
    """"<caption> in the style of <word>" per image, or Textual Inversion's style templates without captions;
    `negated`: "not in the style of" (the released NSYNC v5.x negatives' prompts)."""
    prompts = ([f"{caption} in the style of {{}}" for caption in dataset.captions] if any(dataset.captions)
               else list(STYLE_TEMPLATES))
    if negated:
        prompts = [prompt.replace(" in the style of ", " not in the style of ") for prompt in prompts]
    return [prompt.format(word) for prompt in prompts]


def image_latents(pipe, images: np.ndarray, config) -> np.ndarray:
    """The cached posteriors of each image and its mirror image `(N, 2, h, w, 2c)`; with
    `data.latent_sample="once"`, one draw of each, kept for the run (a function of `train.seed`)."""
    moments = mirrored_moments(pipe.vae, images)
    return sampled_once(moments, config.train.seed) if config.data.latent_sample == "once" else moments


def time_ids_of(pipe, images: np.ndarray, crops: np.ndarray | None) -> np.ndarray | None:
    """SDXL's micro-conditioning `(N, 2, 6)` of images `(N, H, W, 3)` and their mirror images from their
    `style_dataset.crop_record`s (None: squares as given, (H, W) cropped at (0, 0)); None for an SD model."""
    if not isinstance(pipe, StableDiffusionXL):
        return None
    size = images.shape[1:3]
    if crops is None:
        crops = np.broadcast_to(np.asarray([*size, 0, 0], np.float32), (len(images), 2, 4))
    return image_time_ids(crops, size)


def prepare(pipe, dataset: StyleDataset, config, token: str, *, negative_word: str | None = None,
            keep_images: bool = False, negated_negatives: bool = False) -> PreparedData:
    """Prompt ids and cached posteriors (`image_latents`). `negative_word`: also the same prompts with it in
    place of `token` (DreamArtist's negative prompts); `keep_images`: keep the pixels (for a reconstruction
    loss); `negated_negatives`: the negative images' prompts say "not in the style of" the token."""
    def prompt_ids(word, negated=False):
        ids = pipe.token_ids(training_prompts(dataset, word, negated))
        return np.stack(ids, axis=1) if isinstance(ids, tuple) else ids  # SDXL: (prompts, 2 tokenizers, tokens)

    positives = image_latents(pipe, dataset.positives, config)
    loss_weights = None
    if dataset.masks is not None:  # at latent size, for each image and its mirror image
        weights = mask_weights(dataset.masks, positives.shape[2])
        loss_weights = np.stack([weights, weights[:, :, ::-1]], axis=1)
    return PreparedData(
        ids=prompt_ids(token), positives=positives, prompts=training_prompts(dataset, token),
        negatives=image_latents(pipe, dataset.negatives, config) if dataset.negatives is not None else None,
        captioned=any(dataset.captions), negative_word_ids=prompt_ids(negative_word) if negative_word else None,
        negative_ids=prompt_ids(token, negated=True) if negated_negatives else None,
        loss_weights=loss_weights, images=dataset.positives if keep_images else None,
        time_ids=time_ids_of(pipe, dataset.positives, dataset.crops),
        negative_time_ids=time_ids_of(pipe, dataset.negatives, dataset.negative_crops)
        if dataset.negatives is not None else None)


@dataclasses.dataclass(frozen=True)
class Draw:
    """Which examples a step takes: positives `index` `(batch,)`, for contrastive steps their negatives and a
    random other positive each (`anchor`), whether each group's example is mirrored `flips` `(groups, batch)`,
    and without captions the template of each prompt."""

    index: np.ndarray
    anchor: np.ndarray | None
    flips: np.ndarray
    template: np.ndarray | None


def draw_examples(data: PreparedData, batch_size: int, seed: int, step: int, *, contrastive: bool,
                  flip: bool = True) -> Draw:
    rng = np.random.default_rng([seed, step])
    count = len(data.positives)
    index = rng.integers(0, count, batch_size)
    anchor = None
    if contrastive:
        anchor = (index + rng.integers(1, count, batch_size)) % count if count > 1 else index
    flips = rng.integers(0, 2, (3 if contrastive else 1, batch_size))
    if not flip:  # drawn all the same, so that the other draws do not depend on `flip`
        flips = np.zeros_like(flips)
    template = None if data.captioned else rng.integers(0, len(data.ids), batch_size)
    return Draw(index, anchor, flips, template)


def style_batch(data: PreparedData, draw: Draw) -> dict[str, np.ndarray]:
    """ids `(groups, batch, tokens)`, mean and logvar `(groups, batch, h, w, c)`: the positives, then for a
    contrastive draw their negatives and the anchors; on SDXL each example's own `time_ids` `(groups, batch, 6)`."""
    groups = [(data.positives, data.time_ids, draw.index)]
    if draw.anchor is not None:
        groups += [(data.negatives, data.negative_time_ids, draw.index), (data.positives, data.time_ids, draw.anchor)]
    moments = np.stack([source[i, draw.flips[g]] for g, (source, _, i) in enumerate(groups)])
    prompt_ids = [data.ids] + ([data.ids if data.negative_ids is None else data.negative_ids, data.ids]
                               if draw.anchor is not None else [])
    if data.captioned:
        ids = np.stack([table[i] for table, (_, _, i) in zip(prompt_ids, groups)])
    else:
        ids = np.stack([table[draw.template] for table in prompt_ids])
    mean, logvar = np.split(moments, 2, axis=-1)
    batch = {"ids": ids, "mean": mean, "logvar": logvar}
    if data.time_ids is not None:
        batch["time_ids"] = np.stack([time_ids[i, draw.flips[g]] for g, (_, time_ids, i) in enumerate(groups)])
    return batch
