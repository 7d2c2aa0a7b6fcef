"""Caption-matched image sets: NSYNC's negatives, its test-image generation and their relatives.

For each caption `<stem>` (a caption file `<stem>.txt`, read by `imageio.read_captions`, or a line of a
prompt list, `imageio.read_prompt_list`), the model draws `template.format(caption=..., **fields)`: e.g. "a
harbour at dawn in the style of painting" with the frozen base model (the negatives: `nsync-jax negatives`,
whose template also takes {style_phrase}; "... a natural image, no styles." is the released code's content set),
or "a harbour at dawn in the style of <token>" with learned embeddings or LoRA files (`nsync-jax sample
--captions`, the released `gen_imgs.py`). Outputs are `<stem>.png`, or `<stem>_<k>.png` for several images per
caption.

A set is resumable and reproducible: image k of a stem starts from the noise of `(seed, stem, k)` and is a
function of that and the settings the manifest records alone, byte for byte: the same file on any number of
devices or hosts, whichever images are drawn with it (`sampling.SampleSettings.batch_size`). A rerun keeps
every valid image and draws only missing or unreadable ones, with the same settings (the per-device batch
included: it is the shape the images are computed in); every file (images and `manifest.json`) is written
under a temporary name and renamed, so a kill never leaves half a file.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import string
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from PIL import Image

from nsync_jax import checkpoints, distributed, imageio, tokens
from nsync_jax.errors import UserError
from nsync_jax.files import write_json
from nsync_jax.pipeline import MICRO_CONDITIONING, StableDiffusion
from nsync_jax.sampling import SampleSettings, generate

DEFAULT_TEMPLATE = "{caption} {style_phrase}"
DEFAULT_STYLE_PHRASE = "in the style of painting"  # the released code's negatives (its initializer word)
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Item:
    stem: str
    k: int
    prompt: str

    def filename(self, images_per_caption: int) -> str:
        return f"{self.stem}.png" if images_per_caption == 1 else f"{self.stem}_{self.k}.png"


# ------------------------------------------------------------------------------------------------------------
# Captions and prompts.
# ------------------------------------------------------------------------------------------------------------

def build_prompts(captions: dict[str, str], template: str, **fields: str) -> dict[str, str]:
    """`{stem: template.format(caption=caption, **fields)}`; the template must use {caption} and may use only
    the `fields` besides (a placeholder nothing fills is an error, not an empty string)."""
    allowed = ["caption", *fields]
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        if "caption" not in used or not used <= set(allowed):
            names = " and ".join(f"{{{name}}}" for name in allowed)
            raise UserError(f"--template {template!r}: needs {{caption}} and may use only {names}")
        return {stem: template.format(caption=caption, **fields).strip() for stem, caption in captions.items()}
    except ValueError as e:  # unbalanced braces, a format spec such as {caption:d}
        raise UserError(f"--template {template!r}: not a format string ({e})") from None


def choose_prompts(prompts: dict[str, str], count: int, seed: int, source: Path) -> dict[str, str]:
    """`count` of a prompt list's prompts (`imageio.read_prompt_list`), drawn at random without replacement by
    `seed`, in line order. The released `gen_imgs_random_prompts.py` draws every line; a subset keeps the lines'
    names, so a rerun stays resumable."""
    if count > len(prompts):
        raise UserError(f"--num-prompts {count}: {source} has only {len(prompts)} prompts")
    chosen = set(np.random.default_rng(seed).choice(list(prompts), count, replace=False))
    return {stem: prompt for stem, prompt in prompts.items() if stem in chosen}


def check_prompt_lengths(prompts: dict[str, str], tokenizer, source: Callable[[str], str], strict: bool) -> None:
    """A prompt longer than the text encoder's context is truncated (as diffusers does) with a warning naming
    where it comes from (`source(stem)`: its caption file, its line), or is an error with `strict`."""
    limit = tokenizer.model_max_length
    too_long = [stem for stem, prompt in prompts.items()
                if len(tokenizer(tokens.expand_placeholders(prompt, tokenizer)).input_ids) > limit]
    if not too_long:
        return
    message = (f"{len(too_long)} prompt(s) longer than the text encoder's {limit} tokens: "
               f"{', '.join(source(stem) for stem in too_long)}")
    if strict:
        raise UserError(message + " (--strict)")
    warnings.warn(message + "; they are truncated", stacklevel=2)


# ------------------------------------------------------------------------------------------------------------
# Noise and validity.
# ------------------------------------------------------------------------------------------------------------

def stem_number(stem: str) -> int:
    """A stable 31-bit number for a stem (Python's `hash` changes between runs)."""
    return int.from_bytes(hashlib.sha256(stem.encode()).digest()[:4], "little") & 0x7FFFFFFF


def item_latents(seed: int, items: list[Item], shape: tuple[int, int, int]) -> np.ndarray:
    """Standard normal NHWC latents, image by image from `fold_in(fold_in(key(seed), stem), k)`."""
    def draw(number, k):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), number), k)
        return jax.random.normal(key, shape)

    numbers = np.asarray([stem_number(item.stem) for item in items], np.uint32)
    ks = np.asarray([item.k for item in items], np.uint32)
    return np.asarray(jax.vmap(draw)(numbers, ks))


def is_valid_image(path: Path, size: int) -> bool:
    """True when `path` is a complete, decodable `size` x `size` image."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size == (size, size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable manifest ({e}); move it away to redraw the whole set") from None


# ------------------------------------------------------------------------------------------------------------
# The set.
# ------------------------------------------------------------------------------------------------------------

def generate_set(pipe: StableDiffusion, prompts: dict[str, str], output: Path, *, settings: SampleSettings,
                 seed: int = 0, images_per_caption: int = 1, save_size: int | None = None,
                 negative_prompt: str = "", model_name: str = "", weights: dict | None = None,
                 base: StableDiffusion | None = None, progress: bool = True) -> dict[str, int]:
    """Draws every missing or invalid image of the set into `output`; returns counts of kept and drawn.

    `weights` records, for the manifest, what else the images depend on that `pipe` does not show (the LoRA files
    merged into it); `base` is `sampling.generate`'s model of a handoff."""
    output = Path(output)
    resolution = settings.height or pipe.default_resolution
    if settings.width not in (None, resolution):
        raise UserError("image sets are square: give one resolution (--resolution, or --height alone)")
    save_size = save_size or resolution
    pipe.sampling_conditioning(settings, negative_prompt, resolution, resolution)  # refused before any file is written
    items = [Item(stem, k, prompt) for stem, prompt in sorted(prompts.items()) for k in range(images_per_caption)]
    # Keys added since the first sets (dtype onwards) are compared only where a manifest has them.
    manifest = {"model": model_name or str(pipe.folder), "seed": seed, "negative_prompt": negative_prompt,
                "sampler": {"scheduler": settings.scheduler or pipe.scheduler_config.get("_class_name"),
                            "steps": settings.steps, "guidance": settings.guidance,
                            **({"guidance_rescale": settings.guidance_rescale} if settings.guidance_rescale else {})},
                "resolution": resolution, "save_size": save_size, "images_per_caption": images_per_caption,
                "batch_size": settings.batch_size, "dtype": str(pipe.unet.conv_in.kernel[...].dtype),
                "clip_skip": settings.clip_skip, "handoff_timestep": settings.handoff_timestep,
                **{name: list(getattr(settings, name)) for name in MICRO_CONDITIONING  # SDXL's, where given
                   if getattr(settings, name) is not None},
                "learned_rows": hashlib.sha256(b"".join(  # SDXL: both encoders' rows
                    np.ascontiguousarray(rows).tobytes() for rows in jax.tree.leaves(pipe.extra_token_rows))
                ).hexdigest(),
                "weights": weights or {}}
    with checkpoints.workdir_lock(output, "negatives run"):  # one writer per folder (its manifest, its files)
        # A rerun may only complete the same set: other settings would mix two sets in one folder.
        previous = _read_manifest(output / MANIFEST)
        changed = sorted(key for key in manifest if key in previous and previous[key] != manifest[key])
        if changed:
            same_batch = (f" (or --batch-size {previous['batch_size']}: images per device per call, the shape "
                          "its images were computed in, which sets their last bits)" if "batch_size" in changed else "")
            raise UserError(f"{output / MANIFEST}: this folder holds a set made with other settings "
                            f"({', '.join(changed)}); use another --output folder{same_batch}")
        # The manifest lists a file only once it is written, so a file it does not list (or lists with another
        # prompt: an edited caption) is drawn again, as is one that does not decode.
        files = previous.get("files", {})
        todo = [item for item in items
                if files.get(item.filename(images_per_caption)) != item.prompt
                or not is_valid_image(output / item.filename(images_per_caption), save_size)]
        main = distributed.is_main_process()
        if main:
            output.mkdir(parents=True, exist_ok=True)
            write_json(output / MANIFEST, {**manifest, "files": files}, sort_keys=True)

        factor = pipe.vae_scale_factor
        latent_shape = (resolution // factor, resolution // factor, pipe.unet.config.in_channels)

        def save_one(item: Item, image: np.ndarray) -> None:
            pixels = imageio.to_uint8(image)
            if save_size != resolution:
                pixels = np.asarray(Image.fromarray(pixels).resize((save_size, save_size), Image.BICUBIC))
            imageio.write_png(output / item.filename(images_per_caption), pixels)

        def save(writers: concurrent.futures.Executor, first: int, images: np.ndarray) -> None:
            # PNG compression releases the GIL: a batch's files are encoded side by side (the next batch is
            # already drawing meanwhile), then listed in the manifest together.
            batch_items = todo[first:first + len(images)]
            list(writers.map(save_one, batch_items, images))
            files.update({item.filename(images_per_caption): item.prompt for item in batch_items})
            write_json(output / MANIFEST, {**manifest, "files": files}, sort_keys=True)

        if todo:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as writers:
                generate(pipe, [item.prompt for item in todo], negative_prompt=negative_prompt, seed=seed,
                         settings=dataclasses.replace(settings, height=resolution, width=resolution),
                         latents=lambda indices: item_latents(seed, [todo[i] for i in indices], latent_shape),
                         on_batch=functools.partial(save, writers) if main else None, progress=progress,
                         base=base)
        return {"kept": len(items) - len(todo), "drawn": len(todo)}


def prepare_prompts(pipe: StableDiffusion, template: str, *, captions: Path | None = None,
                    prompt_list: Path | None = None, count: int | None = None, seed: int = 0, strict: bool = False,
                    **fields: str) -> dict[str, str]:
    """The set's prompts by stem, from a folder of caption files or a prompt list (`imageio.read_prompt_list`; with
    `count`, `choose_prompts`), through `build_prompts(..., template, **fields)`, their lengths checked."""
    if (captions is None) == (prompt_list is None):
        raise ValueError("give exactly one of captions and prompt_list")
    if captions is not None:
        prompts = build_prompts(imageio.read_captions(captions), template, **fields)
        source = lambda stem: str(imageio.caption_path(captions, stem))
    else:
        lines = imageio.read_prompt_list(prompt_list)
        prompts = build_prompts(lines if count is None else choose_prompts(lines, count, seed, prompt_list), template,
                                **fields)
        source = lambda stem: f"{prompt_list} line {int(stem.removeprefix('img_')) + 1}"
    check_prompt_lengths(prompts, pipe.tokenizer, source, strict)
    return prompts
