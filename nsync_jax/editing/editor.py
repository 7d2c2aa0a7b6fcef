"""Zero-shot editing of images: pix2pix-zeroCon, pix2pix-zero and SDEdit, batched and compiled.

`edit_images` edits arrays, given the caption's and the edit's text embeddings; `edit_files` is the `edit`
command (images, captions and directions in, files out). Per batch of images:

1. `_invert`: VAE-encode (a posterior draw), then DDIM inversion under the caption, with pix2pix-zero's noise
   regularisation unless it is off;
2. the reference and edit passes (`zerocon`). `settings.reference` chooses where the reference records live:
   - "recompute" (default): one `lax.scan` runs the reference step next to each edit step, so nothing is kept
     (one more UNet call per step, no more device memory: the edit step's gradient dominates either way);
   - "host": the reference pass runs first, step by step, and its records (at 512 px and 50 steps 1.17 G values,
     2.2 GiB an image) wait in host memory in bfloat16 until the edit pass reads them, step by step;
3. decoding.

Each program is jitted once per model and settings, with the frozen weights as arguments and the batch split
over every device (`distributed`). An image's randomness (posterior draw, regularisation shifts, PatchNCE
positions, SDEdit noise) comes from `(seed, image index)`, so an edit does not depend on the batch it is in
(up to rounding).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from nsync_jax import distributed, imageio, schedulers
from nsync_jax.editing import directions, zerocon
from nsync_jax.editing.inversion import NoiseRegularization, invert
from nsync_jax.errors import UserError
from nsync_jax.files import write_json
from nsync_jax.models.vae import sample_posterior
from nsync_jax.pipeline import StableDiffusion
from nsync_jax.sampling import decode_latents, image_noise_key

METHODS = ("zerocon", "pix2pix-zero", "sdedit")
REFERENCE_STORAGE = ("recompute", "host")
# pix2pix-zeroCon's L_cut step size is not published (CDS uses 3, in another setting). On the bundled toy
# world, 1 kept a recoloured shape's outline where 0.1 did not; unmeasured on SD 1.5.
DEFAULT_CUT_WEIGHT = 1.0
# Each image's random streams: key (seed, image index) folded with one of these.
_POSTERIOR, _REGULARIZATION, _PATCHES, _SDEDIT_NOISE = range(4)


@dataclasses.dataclass(frozen=True)
class EditSettings:
    method: str = "zerocon"
    steps: int = 50  # DDIM steps of the inversion and of both passes
    guidance: float = 5.0  # classifier-free guidance of the edit, with the caption as the negative prompt
    xa_guidance: float = 0.1  # step size on L_xa
    cut_weight: float | None = None  # step size on L_cut; None: DEFAULT_CUT_WEIGHT, or 0 for pix2pix-zero
    regularization: NoiseRegularization | None = NoiseRegularization()  # None: plain DDIM inversion
    cut: zerocon.CutSettings = zerocon.CutSettings()
    strength: float = 0.5  # SDEdit: the fraction of the steps the image is noised back (1: pure noise)
    reference: str = "recompute"  # or "host"
    batch_size: int = 1  # images per compiled call; at 512 px each takes ~10 GB for the gradient (float32)

    def checked(self) -> EditSettings:
        """These settings with `cut_weight` resolved, or a `UserError` naming the flag at fault."""
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.reference not in REFERENCE_STORAGE:
            raise UserError(f"--reference {self.reference!r} is not one of {', '.join(REFERENCE_STORAGE)}")
        if self.method == "pix2pix-zero" and self.cut_weight:
            raise UserError("--cut-weight must be 0 with --method pix2pix-zero (pix2pix-zeroCon without L_cut)")
        if not 0 < self.strength <= 1:
            raise UserError(f"--strength must be in (0, 1], got {self.strength}")
        if self.cut_weight is not None:
            return self
        return dataclasses.replace(self, cut_weight=0.0 if self.method == "pix2pix-zero" else DEFAULT_CUT_WEIGHT)

    def sdedit_start(self) -> int:
        """The DDIM step SDEdit starts from (diffusers' img2img rounding)."""
        return self.steps - min(int(self.steps * self.strength), self.steps)


@dataclasses.dataclass
class EditResult:
    edited: np.ndarray  # (N, H, W, 3) float32 in [0, 1]
    reconstruction: np.ndarray  # the reference pass's image; for SDEdit, the VAE round trip of the input
    attention_maps: np.ndarray | None  # (N, 2, h, w): word maps of the reference and edit pass; None for SDEdit
    losses: np.ndarray | None  # (N, steps, 2): L_xa and L_cut before each step's update; None for SDEdit


# ------------------------------------------------------------------------------------------------------------
# The compiled programs: pure functions of (frozen weights, batch arrays, scalars).
# ------------------------------------------------------------------------------------------------------------

def _image_keys(seed, indices, purpose: int) -> jax.Array:
    return jax.vmap(lambda index: jax.random.fold_in(image_noise_key(seed, index), purpose))(indices)


# The weights each graph merges with: the recording UNet is the UNet with some layers' flags set.
_WEIGHTS = {"unet": "unet", "recording_unet": "unet", "vae": "vae"}


def _models(graphdefs, frozen, *names):
    return [nnx.merge(graphdefs[name], frozen[_WEIGHTS[name]]) for name in names]


def _ddim(scheduler) -> schedulers.DDIMSampler:
    """`scheduler`: (the model's scheduler config as JSON, steps), hashable for the compile cache."""
    config_json, steps = scheduler
    return schedulers.DDIMSampler(json.loads(config_json), steps)


def _inversion(scheduler) -> schedulers.DDIMInverseSampler:
    config_json, steps = scheduler
    return schedulers.DDIMInverseSampler(json.loads(config_json), steps)


def _encode(vae, images, keys):
    compute_dtype = vae.encoder.conv_in.kernel[...].dtype
    mean, logvar = vae.encode(images.astype(compute_dtype))
    latents = jax.vmap(sample_posterior)(mean.astype(jnp.float32), logvar.astype(jnp.float32), keys)
    return latents * vae.config.scaling_factor


def _invert(frozen, batch, scalars, *, graphdefs, scheduler, regularization):
    unet, vae = _models(graphdefs, frozen, "unet", "vae")
    latents = _encode(vae, batch["images"], _image_keys(scalars["seed"], batch["index"], _POSTERIOR))
    keys = _image_keys(scalars["seed"], batch["index"], _REGULARIZATION)
    return {"noise": invert(unet, _inversion(scheduler), latents, batch["caption"], keys, regularization)}


def _weights(scalars) -> zerocon.GuidanceWeights:
    return zerocon.GuidanceWeights(scalars["xa_guidance"], scalars["cut_weight"], scalars["guidance"])


def _both_passes(frozen, batch, scalars, *, graphdefs, scheduler, cut):
    unet, recording_unet = _models(graphdefs, frozen, "unet", "recording_unet")
    reconstruction, edited, losses, maps = zerocon.edit_trajectories(
        unet, recording_unet, _ddim(scheduler), batch["noise"], batch["caption"], batch["edit"],
        _image_keys(scalars["seed"], batch["index"], _PATCHES), _weights(scalars), cut, batch["reference_tokens"],
        batch["edit_tokens"])
    return {"reconstruction": reconstruction, "edited": edited, "losses": jnp.moveaxis(losses, 2, 0),
            "maps": jnp.moveaxis(maps, 1, 0)}


def _reference_step(frozen, batch, scalars, *, graphdefs, scheduler):
    (recording_unet,) = _models(graphdefs, frozen, "recording_unet")
    latents, recording = zerocon.reference_step(recording_unet, _ddim(scheduler), batch["latents"], scalars["step"],
                                                batch["caption"])
    as_bfloat16 = lambda arrays: [x.astype(jnp.bfloat16) for x in arrays]
    word_map = zerocon.word_attention_map(recording.probs, batch["reference_tokens"], latents.shape[1:3])
    return {"latents": latents, "probs": as_bfloat16(recording.probs), "features": as_bfloat16(recording.features),
            "map": word_map}


def _edit_step(frozen, batch, scalars, *, graphdefs, scheduler, cut):
    unet, recording_unet = _models(graphdefs, frozen, "unet", "recording_unet")
    reference = zerocon.Recording(None, batch["probs"], batch["features"])
    keys = zerocon.step_keys(_image_keys(scalars["seed"], batch["index"], _PATCHES), scalars["step"])
    latents, losses, probs = zerocon.edit_step(unet, recording_unet, _ddim(scheduler), batch["latents"],
                                               scalars["step"], batch["caption"], batch["edit"], reference, keys,
                                               _weights(scalars), cut)
    word_map = zerocon.word_attention_map(probs, batch["edit_tokens"], latents.shape[1:3])
    return {"latents": latents, "losses": jnp.stack(losses, axis=-1), "map": word_map}


def _sdedit(frozen, batch, scalars, *, graphdefs, scheduler, start):
    unet, vae = _models(graphdefs, frozen, "unet", "vae")
    latents = _encode(vae, batch["images"], _image_keys(scalars["seed"], batch["index"], _POSTERIOR))
    noise_keys = _image_keys(scalars["seed"], batch["index"], _SDEDIT_NOISE)
    noise = jax.vmap(lambda key: jax.random.normal(key, latents.shape[1:]))(noise_keys)
    config_json, _ = scheduler
    alphas_cumprod = schedulers.NoiseSchedule.from_config(json.loads(config_json)).alphas_cumprod
    edited = zerocon.sdedit(unet, _ddim(scheduler), alphas_cumprod, latents, noise, start, batch["negative"],
                            batch["edit"], scalars["guidance"])
    return {"latents": latents, "edited": edited}


def _decode(frozen, batch, scalars, *, graphdefs):
    (vae,) = _models(graphdefs, frozen, "vae")
    return {"images": decode_latents(vae, batch["latents"], vae.encoder.conv_in.kernel[...].dtype)}


@functools.lru_cache(maxsize=32)
def _compiled(program, graphdefs_key, mesh, static):
    """`program` jitted for one model structure and static settings: weights and scalars replicated, the batch
    split over the mesh, results replicated (every process can read them)."""
    fn = functools.partial(program, graphdefs=dict(graphdefs_key), **dict(static))
    batch, whole = distributed.batch_sharded(mesh), distributed.replicated(mesh)
    return jax.jit(fn, in_shardings=(whole, batch, whole), out_shardings=whole)


_EXECUTABLES: dict = {}


class _Runner:
    """Runs the programs for one model: places the frozen weights once, pads each batch to the device count."""

    def __init__(self, pipe: StableDiffusion, *, record_features: bool):
        self.mesh = distributed.make_mesh()
        graphdefs, frozen = {}, {}
        graphdefs["unet"], frozen["unet"] = nnx.split(pipe.unet)
        graphdefs["vae"], frozen["vae"] = nnx.split(pipe.vae)
        graphdefs["recording_unet"] = zerocon.recording_graphdef(pipe.unet, features=record_features)
        self.graphdefs_key = tuple(sorted(graphdefs.items()))
        whole = distributed.replicated(self.mesh)
        self.frozen = distributed.put_tree(frozen, jax.tree.map(lambda _: whole, frozen))
        self.scheduler_json = json.dumps(pipe.scheduler_config, sort_keys=True)

    def scheduler(self, steps: int) -> tuple[str, int]:
        return self.scheduler_json, steps

    def __call__(self, program, batch: dict, scalars: dict, **static) -> dict:
        """`program` on `batch` (host arrays, batch first) and `scalars`; returns host arrays, batch first."""
        run = _compiled(program, self.graphdefs_key, self.mesh, tuple(sorted(static.items())))
        count = len(jax.tree.leaves(batch)[0])
        sharding, whole = distributed.batch_sharded(self.mesh), distributed.replicated(self.mesh)
        devices = distributed.batch_size_of(self.mesh)
        batch = jax.tree.map(lambda x: distributed.put(distributed.pad_batch(np.asarray(x), devices), sharding), batch)
        scalars = {name: distributed.put(np.asarray(value), whole) for name, value in scalars.items()}
        key = (run, tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)))
        if key not in _EXECUTABLES:
            _EXECUTABLES[key] = distributed.compile_together(run, self.frozen, batch, scalars, name="edit")
        outputs = _EXECUTABLES[key](self.frozen, batch, scalars)
        return jax.tree.map(lambda x: distributed.to_host(x)[:count], outputs)


# ------------------------------------------------------------------------------------------------------------
# Editing arrays.
# ------------------------------------------------------------------------------------------------------------

def _zero_shot_batch(run: _Runner, batch: dict, settings: EditSettings, seed: int) -> EditResult:
    scheduler = run.scheduler(settings.steps)
    cut = settings.cut if settings.method == "zerocon" else None
    scalars = {"seed": np.int32(seed), "xa_guidance": np.float32(settings.xa_guidance),
               "cut_weight": np.float32(settings.cut_weight), "guidance": np.float32(settings.guidance)}
    noise = run(_invert, {k: batch[k] for k in ("images", "caption", "index")}, {"seed": scalars["seed"]},
                scheduler=scheduler, regularization=settings.regularization)["noise"]
    passes = {"noise": noise, **{k: batch[k] for k in ("caption", "edit", "index", "reference_tokens", "edit_tokens")}}
    if settings.reference == "recompute":
        out = run(_both_passes, passes, scalars, scheduler=scheduler, cut=cut)
        reconstruction, edited, losses, maps = out["reconstruction"], out["edited"], out["losses"], out["maps"]
    else:
        reconstruction, edited, losses, maps = _passes_with_host_reference(run, passes, scalars, settings.steps, cut)
    decode = lambda latents: run(_decode, {"latents": latents}, {})["images"]
    return EditResult(decode(edited), decode(reconstruction), maps, losses)


def _passes_with_host_reference(run: _Runner, passes: dict, scalars: dict, steps: int, cut):
    """The reference pass step by step, its records kept on the host (bfloat16), then the edit pass."""
    scheduler = run.scheduler(steps)
    latents, records, reference_maps = passes["noise"], [], []
    for step in range(steps):
        out = run(_reference_step, {"latents": latents, "caption": passes["caption"],
                                    "reference_tokens": passes["reference_tokens"]},
                  {"step": np.int32(step)}, scheduler=scheduler)
        latents = out["latents"]
        records.append({"probs": out["probs"], "features": out["features"]})
        reference_maps.append(out["map"])
    reconstruction, latents, losses, edit_maps = latents, passes["noise"], [], []
    edit_inputs = {k: passes[k] for k in ("caption", "edit", "index", "edit_tokens")}
    for step in range(steps):
        out = run(_edit_step, {"latents": latents, **edit_inputs, **records[step]},
                  {**scalars, "step": np.int32(step)}, scheduler=scheduler, cut=cut)
        records[step] = None  # the host keeps only the steps still to come
        latents = out["latents"]
        losses.append(out["losses"])
        edit_maps.append(out["map"])
    maps = np.stack([np.mean(reference_maps, axis=0), np.mean(edit_maps, axis=0)], axis=1)
    return reconstruction, latents, np.stack(losses, axis=1), maps


def _sdedit_batch(run: _Runner, batch: dict, settings: EditSettings, seed: int) -> EditResult:
    out = run(_sdedit, {k: batch[k] for k in ("images", "edit", "negative", "index")},
              {"seed": np.int32(seed), "guidance": np.float32(settings.guidance)},
              scheduler=run.scheduler(settings.steps), start=settings.sdedit_start())
    decode = lambda latents: run(_decode, {"latents": latents}, {})["images"]
    return EditResult(decode(out["edited"]), decode(out["latents"]), None, None)


def edit_images(pipe: StableDiffusion, images: np.ndarray, caption_contexts: np.ndarray, edit_contexts: np.ndarray,
                *, reference_tokens: np.ndarray, edit_tokens: np.ndarray, settings: EditSettings = EditSettings(),
                seed: int = 0, progress: bool = True) -> EditResult:
    """Edits `images` `(N, H, W, 3)` in [-1, 1].

    Args:
      caption_contexts: the text encoder's output for each image's caption `(N, tokens, width)`.
      edit_contexts: the edited embeddings, caption plus direction, same shape.
      reference_tokens, edit_tokens: `(N, tokens)` bool, the tokens whose cross-attention maps are drawn for
        the reference and the edit pass (the edited word).
    """
    settings = settings.checked()
    run = _Runner(pipe, record_features=settings.method == "zerocon")
    arrays = {"images": images.astype(np.float32), "caption": caption_contexts.astype(np.float32),
              "edit": edit_contexts.astype(np.float32), "index": np.arange(len(images), dtype=np.int32),
              "reference_tokens": reference_tokens, "edit_tokens": edit_tokens}
    if settings.method == "sdedit":
        # The usual img2img baseline: the empty prompt as the negative.
        negative = directions.encode_prompts(pipe, [""])
        arrays["negative"] = np.repeat(negative, len(images), axis=0)
    edit_batch = _sdedit_batch if settings.method == "sdedit" else _zero_shot_batch
    results = []
    bar = tqdm(total=len(images), unit="img", disable=not (progress and distributed.is_main_process()))
    for first in range(0, len(images), settings.batch_size):
        batch = {name: array[first:first + settings.batch_size] for name, array in arrays.items()}
        results.append(edit_batch(run, batch, settings, seed))
        bar.update(len(batch["index"]))
    bar.close()
    join = lambda name: (None if getattr(results[0], name) is None
                         else np.concatenate([getattr(r, name) for r in results]))
    return EditResult(*(join(field.name) for field in dataclasses.fields(EditResult)))


# ------------------------------------------------------------------------------------------------------------
# Editing files.
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class InputImages:
    paths: list[Path]
    pictures: list[Image.Image]  # RGB, resized when asked


def read_images(paths: Sequence[Path], resolution: int | None = None) -> InputImages:
    """The images of `paths` (files, or folders of images by `imageio.image_files`), resized to `resolution`
    squared (Lanczos, as pix2pix-zero) if given; a missing or unreadable file is an error naming it."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += imageio.image_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: image not found")
    pictures = []
    for path in files:
        try:
            with Image.open(path) as image:
                picture = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"{path}: cannot read the image ({type(e).__name__})") from None
        if resolution is not None:
            picture = picture.resize((resolution, resolution), Image.Resampling.LANCZOS)
        pictures.append(picture)
    return InputImages(files, pictures)


def _check_sizes(inputs: InputImages, factor: int) -> None:
    sizes = {picture.size for picture in inputs.pictures}
    if len(sizes) > 1:
        listed = ", ".join(f"{p} {w}x{h}" for p, (w, h) in zip(inputs.paths, (q.size for q in inputs.pictures)))
        raise UserError(f"the images differ in size ({listed}); pass --resolution N to resize them all to N x N")
    for path, picture in zip(inputs.paths, inputs.pictures):
        width, height = picture.size
        if width % factor or height % factor:
            raise UserError(f"{path}: size {width}x{height} is not divisible by {factor}; pass --resolution N "
                            f"(a multiple of {factor}) to resize it to N x N")


def _captions(inputs: InputImages, captions: Sequence[str] | None, captioner: Path | None) -> list[str]:
    if captioner is not None:
        from nsync_jax.captions import caption_images, load_captioner

        processor, model = load_captioner(captioner)
        captions = caption_images(processor, model, inputs.pictures)
        for path, caption in zip(inputs.paths, captions):
            if not caption:
                raise UserError(f"{captioner}: produced an empty caption for {path}; pass --caption")
        return captions
    if not captions:
        raise UserError("give the image's caption with --caption TEXT or a captioner with --captioner DIR")
    if len(captions) not in (1, len(inputs.paths)):
        raise UserError(f"{len(captions)} --caption for {len(inputs.paths)} images: give one for all, or one each")
    captions = [imageio.caption_text(caption, "--caption") for caption in captions]
    return captions * (len(inputs.paths) // len(captions))


def _output_folders(output: Path, paths: list[Path]) -> list[Path]:
    """`output` for one image, else `output/<stem>` per image."""
    if len(paths) == 1:
        return [output]
    stems = [p.stem for p in paths]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise UserError(f"several images are named {', '.join(repeated)}: their outputs would share a folder")
    return [output / stem for stem in stems]


def _heat(values: np.ndarray) -> np.ndarray:
    """`(H, W)` values in [0, 1] -> an RGB heat map (black, red, yellow, white)."""
    return np.clip(np.stack([3 * values, 3 * values - 1, 3 * values - 2], axis=-1), 0, 1)


def attention_picture(reconstruction: np.ndarray, edited: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """The word's cross-attention maps `(2, h, w)` over the reconstruction and the edited image, side by side."""
    panels = []
    for image, word_map in zip((reconstruction, edited), maps):
        height, width = image.shape[:2]
        scaled = word_map / max(float(word_map.max()), 1e-12)
        resized = np.asarray(Image.fromarray(scaled.astype(np.float32)).resize((width, height),
                                                                                 Image.Resampling.BILINEAR))
        panels.append(0.4 * image + 0.6 * _heat(np.clip(resized, 0, 1)))
    return np.concatenate(panels, axis=1)


@dataclasses.dataclass
class _Edit:
    """What an edit request becomes before the model runs."""

    edit_contexts: np.ndarray  # (N, tokens, width): each caption's embedding plus the direction
    provenance: dict  # where the direction came from, for edit.json
    reference_words: list[list[str]]  # per image, the words whose attention is drawn in the reference pass ...
    edit_words: list[list[str]]  # ... and in the edit pass
    edit_prompts: list[str]  # the prompts whose tokens `edit_words` are found in


def _word_edit(pipe, captions, caption_contexts, source, target, banks, cache_dir) -> _Edit:
    source, target = directions.check_word(source, "--source"), directions.check_word(target, "--target")
    delta, provenance = directions.word_direction(pipe, source, target, banks=banks, cache_dir=cache_dir)
    # The direction moves every position alike, so the source word's tokens stay where the caption has them.
    words = [[source]] * len(captions)
    return _Edit(caption_contexts + delta, provenance, words, words, list(captions))


def _prompt_edit(pipe, captions, target_prompt) -> _Edit:
    if not target_prompt.strip():
        raise UserError("--target-prompt is empty")
    # The caption plus the direction (target - caption) is the target prompt's embedding.
    edit_contexts = np.repeat(directions.encode_prompts(pipe, [target_prompt]), len(captions), axis=0)
    target_words = target_prompt.lower().split()
    caption_words = [caption.lower().split() for caption in captions]
    return _Edit(edit_contexts, {"kind": "target prompt", "target_prompt": target_prompt},
                 [[w for w in words if w not in target_words] for words in caption_words],
                 [[w for w in target_words if w not in words] for words in caption_words],
                 [target_prompt] * len(captions))


def edit_files(pipe: StableDiffusion, inputs: InputImages, output: Path, *, source: str | None = None,
               target: str | None = None, target_prompt: str | None = None, captions: Sequence[str] | None = None,
               captioner: Path | None = None, banks: Path | None = None, settings: EditSettings = EditSettings(),
               seed: int = 0, progress: bool = True) -> list[Path]:
    """The `edit` command: edits `inputs` from `source` to `target` (sentence banks in `banks`, else
    templates; cached in `banks`, else `output/directions`) or towards `target_prompt`, and writes
    `edited.png`, `reconstruction.png`, `attention.png` and `edit.json` into one folder per image (`output`
    itself for a single image). Returns the folders."""
    settings = settings.checked()
    if (source is None) != (target is None) or (source is None) == (target_prompt is None):
        raise UserError("give either --source WORD and --target WORD, or --target-prompt TEXT")
    _check_sizes(inputs, pipe.vae_scale_factor)
    folders = _output_folders(Path(output), inputs.paths)
    captions = _captions(inputs, captions, captioner)
    caption_contexts = directions.encode_prompts(pipe, captions)
    if target_prompt is None:
        edit = _word_edit(pipe, captions, caption_contexts, source, target, banks,
                          banks or Path(output) / "directions")
    else:
        edit = _prompt_edit(pipe, captions, target_prompt)
    reference_tokens = np.stack([directions.word_token_mask(pipe.tokenizer, caption, words)
                                 for caption, words in zip(captions, edit.reference_words)])
    edit_tokens = np.stack([directions.word_token_mask(pipe.tokenizer, prompt, words)
                            for prompt, words in zip(edit.edit_prompts, edit.edit_words)])
    pixels = np.stack([np.asarray(p, np.float32) / 127.5 - 1.0 for p in inputs.pictures])
    result = edit_images(pipe, pixels, caption_contexts, edit.edit_contexts, reference_tokens=reference_tokens,
                         edit_tokens=edit_tokens, settings=settings, seed=seed, progress=progress)
    if not distributed.is_main_process():
        return folders
    for i, folder in enumerate(folders):
        imageio.write_png(folder / "edited.png", result.edited[i])
        imageio.write_png(folder / "reconstruction.png", result.reconstruction[i])
        drawn = result.attention_maps is not None and reference_tokens[i].any() and edit_tokens[i].any()
        if drawn:
            imageio.write_png(folder / "attention.png",
                              attention_picture(result.reconstruction[i], result.edited[i], result.attention_maps[i]))
        record = {
            "image": str(inputs.paths[i]), "caption": captions[i], "direction": edit.provenance,
            "settings": {**_settings_record(settings), "seed": seed, "model": str(pipe.folder),
                         "dtype": str(pipe.unet.conv_in.kernel[...].dtype), "size": list(inputs.pictures[i].size)},
            "attention_map": ({"file": "attention.png", "reference_words": edit.reference_words[i],
                               "edit_words": edit.edit_words[i]} if drawn else None),
            "losses": None if result.losses is None else {
                "cross_attention": result.losses[i, :, 0].tolist(), "contrastive": result.losses[i, :, 1].tolist()},
        }
        write_json(folder / "edit.json", record)
    return folders


def _settings_record(settings: EditSettings) -> dict:
    record = dataclasses.asdict(settings)
    record.pop("batch_size")
    if settings.method != "sdedit":
        record.pop("strength")
    else:
        for key in ("xa_guidance", "cut_weight", "regularization", "cut", "reference"):
            record.pop(key)
    return record
