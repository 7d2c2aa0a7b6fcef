"""Text-to-image sampling: classifier-free guidance, the whole denoising loop compiled once.

`generate` is the entry point for every caller that draws images (the `sample` command, negative-set
generation, demos): there is one denoising loop in the project, `_denoise_and_decode`. It is a pure
function of the frozen weights and the sampler's tables (passed as arguments, never captured), the token ids
and the initial latents, scanned over the sampler's steps with `lax.scan`, and jitted with the batch split
over every device of every process (`distributed.make_mesh`), each device running the loop on its own rows
(`shard_map`); every process gets the whole batch of images back. The model (`pipeline.Pipeline`: SD 1.x/2.x or
SDXL) says how token ids condition its UNet: its conditioner (static) and that conditioner's array inputs (SDXL's
`time_ids`).

An image is a function of its noise, its prompt and the settings alone, bit for bit: the same bytes whatever
the number of devices or hosts and whichever images are drawn with it (see `SampleSettings.batch_size`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nsync_jax import distributed
from nsync_jax.errors import UserError
from nsync_jax.imageio import write_png
from nsync_jax.lora import merge_lora, read_lora_file, recorded_handoff
from nsync_jax.models.vae import AutoencoderKL
from nsync_jax.pipeline import Pipeline, load_pipeline
from nsync_jax.schedulers import make_sampler


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    scheduler: str | None = None  # None: the model's own scheduler
    steps: int = 50
    guidance: float = 7.5
    # diffusers' `guidance_rescale` (Lin et al. 2023, section 3.4): 0 off; 0.7 pulls each guided prediction's
    # standard deviation 70% of the way back to the prompt branch's (against over-exposure at high guidance).
    guidance_rescale: float = 0.0
    height: int | None = None  # None: the model's default resolution
    width: int | None = None
    clip_skip: int = 0
    # Images per device per compiled call. Every call has this shape, the last one padded: XLA blocks a
    # convolution's or matmul's sums by the batch it is compiled for, so another per-device batch moves an image
    # by float rounding (a pixel by one grey level, rarely), while the image's position in the batch, the device
    # count and which images share the call change nothing. Large on accelerators (throughput), small on a CPU
    # (a padded last call costs the full batch there).
    batch_size: int = 8
    # >0, with `generate(..., base=...)`: timesteps at or above it are denoised by the base model, the rest by the
    # tuned one (eDiff-I's expert denoisers, diffusers' `denoising_end`): the base lays out the content, the tuned
    # weights (trained on these timesteps only: `train.max_timestep`) draw the style.
    handoff_timestep: int = 0
    # SDXL's micro-conditioning, (height, width) or (top, left); None: diffusers' defaults (the output size,
    # (0, 0), the output size). Refused on other models.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None


def image_noise_key(seed: int, index) -> jax.Array:
    """The noise key of image `index`: the same image whatever the batch size or device count."""
    return jax.random.fold_in(jax.random.key(seed), index)


def initial_latents(seed: int, indices: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """Standard normal NHWC latents `(len(indices), *shape)`, one independent draw per image index."""
    draw = jax.vmap(lambda index: jax.random.normal(image_noise_key(seed, index), shape))
    return np.asarray(draw(jnp.asarray(indices, jnp.uint32)))


def _sampler_tables(sampler) -> dict[str, np.ndarray]:
    """The numbers a sampler computed from its config (per-step coefficient tables, timesteps, noise scales),
    as arrays for `_denoise_and_decode`'s `tables`. Captured as constants, XLA would fold them into the step's
    arithmetic one way in a one-device program and another in a partitioned one: other roundings, other images."""
    tables = {}
    for name, value in vars(sampler).items():
        if isinstance(value, (np.ndarray, float, np.floating)):
            value = np.asarray(value)
            tables[name] = value.astype(np.float32) if value.dtype.kind == "f" else value
    return tables


def _denoise_and_decode(frozen, extra_rows, cond_ids, uncond_ids, extras, latents, guidance, handoff_timestep,
                        tables, *, graphdefs, sampler, conditioner, use_guidance: bool):
    sampler = copy.copy(sampler)  # the same sampler, reading its `tables` from the arguments
    vars(sampler).update(tables)

    # With a model of its own for guidance's negative branch (prefix "negative_"), each branch runs on its own.
    separate_negative = "negative_unet" in graphdefs

    def condition(prefix, ids, negative):
        """`(context, added_cond)` from the text encoders of the model under `prefix`."""
        encoders = {name: nnx.merge(graphdefs[prefix + name], frozen[prefix + name]) for name in conditioner.encoders}
        return conditioner(encoders, extra_rows, ids, extras, negative=negative)

    def conditions(prefix):
        cond = condition(prefix, cond_ids, False)
        if use_guidance and not separate_negative:
            cond = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), condition(prefix, uncond_ids, True), cond)
        return cond

    # Each denoiser: its UNet and text encoders (prefix "" the model, "base_" the base model of a handoff). The
    # handoff timestep is an argument, not a constant: another timestep does not compile the loop again.
    prefixes = ("", "base_") if "base_unet" in graphdefs else ("",)
    unets = [nnx.merge(graphdefs[p + "unet"], frozen[p + "unet"]) for p in prefixes]
    if separate_negative:
        negative_unet = nnx.merge(graphdefs["negative_unet"], frozen["negative_unet"])
        negative_context = condition("negative_", uncond_ids, True)
    context = [conditions(p) for p in prefixes]
    vae = nnx.merge(graphdefs["vae"], frozen["vae"])
    compute_dtype = unets[0].conv_in.kernel[...].dtype
    timesteps = jnp.asarray(sampler.timesteps)

    def step(carry, index):
        sample, state = carry
        model_input = sampler.scale_model_input(sample, index).astype(compute_dtype)
        if separate_negative:
            uncond_pred, prediction = (unet(model_input, timesteps[index], *c).astype(jnp.float32) for unet, c in
                                       ((negative_unet, negative_context), (unets[0], context[0])))
            return sampler.step(state, _guide(uncond_pred, prediction, **guidance), index, sample), None
        if use_guidance:
            model_input = jnp.concatenate([model_input, model_input])
        branches = [lambda unet=unet, c=c: unet(model_input, timesteps[index], *c).astype(jnp.float32)
                    for unet, c in zip(unets, context)]
        prediction = (jax.lax.switch((timesteps[index] >= handoff_timestep).astype(jnp.int32), branches)
                      if len(branches) > 1 else branches[0]())
        if use_guidance:
            uncond_pred, cond_pred = jnp.split(prediction, 2)
            prediction = _guide(uncond_pred, cond_pred, **guidance)
        return sampler.step(state, prediction, index, sample), None

    latents = latents * sampler.init_noise_sigma
    (latents, _), _ = jax.lax.scan(step, (latents, sampler.init_state(latents)),
                                   jnp.arange(len(sampler.timesteps)))
    # In the VAE's own dtype: float32 for a `force_upcast` SDXL VAE whatever the UNet's.
    return decode_latents(vae, latents, vae.decoder.conv_in.kernel[...].dtype)


def _guide(uncond_pred: jax.Array, cond_pred: jax.Array, scale: jax.Array, rescale: jax.Array) -> jax.Array:
    """Classifier-free guidance, rescaled as diffusers' `rescale_noise_cfg` when `rescale` > 0 (an argument: any
    value runs the same compiled loop; at 0 the guided prediction is returned as it is, bit for bit)."""
    guided = uncond_pred + scale * (cond_pred - uncond_pred)
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (jnp.std(cond_pred, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True))
    return jnp.where(rescale > 0, rescale * rescaled + (1 - rescale) * guided, guided)


def decode_latents(vae: AutoencoderKL, latents: jax.Array, compute_dtype) -> jax.Array:
    """Scaled latents `(batch, h, w, c)` -> float32 images `(batch, f h, f w, 3)` in [0, 1]."""
    images = vae.decode((latents / vae.config.scaling_factor).astype(compute_dtype))
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


# Per jitted loop and batch shape, what runs it: the loop itself, or (several processes) its executable
# compiled by every process before any of them starts (`distributed.compile_together`).
_EXECUTABLES: dict = {}


@functools.lru_cache(maxsize=8)
def _compiled(graphdefs_key, sampler_key, conditioner, use_guidance, mesh):
    """The jitted loop for one model structure and sampler; cached so repeated calls do not retrace."""
    graphdefs = dict(graphdefs_key)
    name, config_json, steps = sampler_key
    sampler = make_sampler(name, json.loads(config_json), steps)
    batch, whole = distributed.batch_sharded(mesh), distributed.replicated(mesh)
    fn = functools.partial(_denoise_and_decode, graphdefs=graphdefs, sampler=sampler, conditioner=conditioner,
                           use_guidance=use_guidance)
    # Each device runs the one-device loop on its own rows: left to sharding propagation, the guidance halves of
    # an image would meet across devices. No collective runs inside, so there is no replication to check (which
    # would ask the samplers to mark their zero initial states as per-device).
    shardings = (whole, whole, batch, batch, whole, batch, whole, whole, whole)
    per_device = jax.shard_map(fn, mesh=mesh, in_specs=tuple(s.spec for s in shardings), out_specs=batch.spec,
                               check_vma=False)
    # Images come back replicated: an all-gather of a few images is nothing next to the denoising loop, and
    # every process (of a multi-host run too) can then read them.
    return jax.jit(per_device, in_shardings=shardings, out_shardings=whole)


def generate(
    pipe: Pipeline,
    prompts: Sequence[str],
    *,
    negative_prompt: str = "",
    num_images_per_prompt: int = 1,
    seed: int = 0,
    settings: SampleSettings = SampleSettings(),
    latents: np.ndarray | Callable[[list[int]], np.ndarray] | None = None,
    on_batch: Callable[[int, np.ndarray], Any] | None = None,
    progress: bool = True,
    base: Pipeline | None = None,
    negative_model: Pipeline | None = None,
) -> np.ndarray:
    """Draws `len(prompts) * num_images_per_prompt` images, prompt by prompt.

    Args:
      latents: optional initial latents, NHWC `(num_images, height/f, width/f, channels)` float32, used
        instead of drawing noise (f is the VAE's downscale factor); or a function of a batch's image indices
        returning that batch's latents (for large sets whose noise has its own scheme).
      on_batch: called as `on_batch(first_index, images)` after each batch (to write files as they come).
      base: the base model that denoises timesteps at or above `settings.handoff_timestep` (same architecture
        and tokenizer as `pipe`; its VAE is not used).
      negative_model: the model of guidance's negative branch, in place of `pipe` there (DreamArtist++: the base
        model with the negative LoRA); same architecture and tokenizer as `pipe`, its VAE not used.

    Returns:
      float32 images `(num_images, height, width, 3)` in [0, 1].
    """
    height = settings.height or pipe.default_resolution
    width = settings.width or pipe.default_resolution
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise UserError(f"--height/--width must be divisible by {factor}, got {height}x{width}")
    latent_shape = (height // factor, width // factor, pipe.unet.config.in_channels)
    all_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    if isinstance(latents, np.ndarray) and tuple(latents.shape) != (len(all_prompts), *latent_shape):
        raise UserError(f"latents have shape {tuple(latents.shape)}, expected {(len(all_prompts), *latent_shape)} "
                        f"(NHWC) for {len(all_prompts)} images of {height}x{width}")

    if (base is None) != (settings.handoff_timestep <= 0):
        raise UserError("a handoff needs both a base model and --handoff-timestep > 0, got "
                        f"{'a' if base is not None else 'no'} base model and {settings.handoff_timestep}")
    # Built here too so that a bad scheduler name or option fails before anything is compiled.
    sampler = make_sampler(settings.scheduler, pipe.scheduler_config, settings.steps,
                           source=pipe.folder / "scheduler" / "scheduler_config.json")
    sampler_key = (settings.scheduler, json.dumps(pipe.scheduler_config, sort_keys=True), settings.steps)
    use_guidance = settings.guidance > 1.0
    if settings.guidance_rescale and not (use_guidance and 0 < settings.guidance_rescale <= 1):
        raise UserError(f"--guidance-rescale must be in [0, 1] and needs --guidance above 1, got "
                        f"{settings.guidance_rescale} with --guidance {settings.guidance}")
    if negative_model is not None and (not use_guidance or base is not None):
        raise UserError("a model for the negative branch (--negative-lora) needs --guidance above 1 and no handoff")
    conditioner, extras = pipe.sampling_conditioning(settings, negative_prompt, height, width)
    mesh = distributed.make_mesh()
    graphdefs, frozen = {}, {}
    for name, module in pipe.modules().items():
        graphdefs[name], frozen[name] = nnx.split(module)
    for prefix, model in (("base_", base), ("negative_", negative_model)):
        if model is not None:
            for name in (*conditioner.encoders, "unet"):
                graphdefs[prefix + name], frozen[prefix + name] = nnx.split(model.modules()[name])
    run = _compiled(tuple(sorted(graphdefs.items())), sampler_key, conditioner, use_guidance, mesh)
    whole = distributed.replicated(mesh)
    replicate = lambda tree: distributed.put_tree(tree, jax.tree.map(lambda _: whole, tree))
    frozen, tables, extras = replicate(frozen), replicate(_sampler_tables(sampler)), replicate(extras)
    extra_rows = replicate(pipe.extra_token_rows)

    cond_ids = pipe.token_ids(all_prompts)
    uncond_ids = pipe.token_ids([negative_prompt] * len(all_prompts))
    batch_sharding = distributed.batch_sharded(mesh)
    batch_size = max(settings.batch_size, 1) * distributed.batch_size_of(mesh)  # one shape for every call
    results = []
    bar = tqdm(total=len(all_prompts), unit="img", disable=not (progress and distributed.is_main_process()))
    start = time.perf_counter()

    def finish(first: int, count: int, images: jax.Array) -> None:
        images = distributed.to_host(images)[:count]
        results.append(images)
        if on_batch is not None:
            on_batch(first, images)
        bar.update(count)
        bar.set_postfix(img_per_s=f"{(first + count) / (time.perf_counter() - start):.2f}")

    # Each batch is dispatched before the previous one is fetched and handed to `on_batch` (PNG writing), so
    # the device draws while the host encodes; at most two batches of images are held.
    pending = None
    for first in range(0, len(all_prompts), batch_size):
        indices = list(range(first, min(first + batch_size, len(all_prompts))))
        if latents is None:
            batch_latents = initial_latents(seed, indices, latent_shape)
        else:
            batch_latents = latents(indices) if callable(latents) else latents[indices]
        put = lambda x: distributed.put(distributed.pad_batch(np.asarray(x), batch_size), batch_sharding)
        args = (frozen, extra_rows, jax.tree.map(lambda ids: put(ids[indices]), cond_ids),
                jax.tree.map(lambda ids: put(ids[indices]), uncond_ids), extras, put(batch_latents.astype(np.float32)),
                replicate({"scale": np.float32(settings.guidance), "rescale": np.float32(settings.guidance_rescale)}),
                distributed.put(np.int32(settings.handoff_timestep), whole), tables)
        key = (run, args[5].shape)
        if key not in _EXECUTABLES:
            _EXECUTABLES[key] = distributed.compile_together(run, *args, name="sample")
        images = _EXECUTABLES[key](*args)
        if pending is not None:
            finish(*pending)
        pending = (first, len(indices), images)
    if pending is not None:
        finish(*pending)
    bar.close()
    return np.concatenate(results)


def load_for_sampling(model: str | Path, *, embeddings: Sequence[Path] = (), lora_files: Sequence[Path] = (),
                      lora_scale: float = 1.0, handoff_timestep: int | None = None, dtype=jnp.float32,
                      attention_backend: str = "auto", revision: str | None = None, variant: str | None = None,
                      model_config: str | Path | None = None, vae: str | Path | None = None
                      ) -> tuple[Pipeline, Pipeline | None, int]:
    """The models `generate` samples with: `(pipe, base, handoff_timestep)`.

    `pipe` is the diffusers folder `model` with the `embeddings` files added and the `lora_files` merged into its
    weights (`W + lora_scale * delta`). With a handoff (`handoff_timestep` > 0; None: the one the LoRA files
    record, else 0), `base` is the same folder with the embeddings but without the LoRA, which denoises the
    timesteps at or above the handoff (pass both and the timestep to `generate`); otherwise `base` is None.
    `model`, `revision`, `variant`, `model_config` and `vae` (another model's VAE, which decodes) are
    `load_pipeline`'s: a folder, a Hugging Face Hub id or a single-file checkpoint.
    """
    if handoff_timestep is None:
        handoff_timestep = recorded_handoff(lora_files)
    if handoff_timestep and not lora_files:
        raise UserError("--handoff-timestep needs --lora: it hands the low timesteps to the LoRA's weights")
    if handoff_timestep < 0:
        raise UserError(f"--handoff-timestep must not be negative, got {handoff_timestep}")

    def load_with_embeddings():
        loaded = load_pipeline(model, dtype=dtype, attention_backend=attention_backend, revision=revision,
                               variant=variant, model_config=model_config, vae=vae, allow_sdxl=True)
        for path in embeddings:
            loaded.add_embeddings(path)
        return loaded

    pipe = load_with_embeddings()
    base = load_with_embeddings() if handoff_timestep else None  # the LoRA weights stay out of it
    for path in lora_files:
        merge_lora(pipe.modules(), read_lora_file(path), lora_scale, source=path)
    return pipe, base, handoff_timestep


def read_latents(path: Path, pipe: Pipeline, num_images: int, settings: SampleSettings) -> np.ndarray:
    """Initial latents for `generate` from a float32 `.npy` in diffusers' layout `(num_images, C, H/f, W/f)` at
    the settings' resolution (f: the VAE's downscale factor), returned in `generate`'s NHWC layout."""
    height = settings.height or pipe.default_resolution
    width = settings.width or pipe.default_resolution
    f = pipe.vae_scale_factor
    expected = (num_images, pipe.unet.config.in_channels, height // f, width // f)
    try:
        latents = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read latents ({e})") from None
    if latents.shape != expected:
        raise UserError(f"{path}: latents have shape {latents.shape}, expected {expected} (N, C, H/f, W/f)")
    return latents.astype(np.float32).transpose(0, 2, 3, 1)


def image_file(folder: Path, index: int) -> Path:
    """Where `generate_to_folder` writes image `index`: `000000.png`, `000001.png`, ..."""
    return Path(folder) / f"{index:06d}.png"


def generate_to_folder(pipe: Pipeline, prompts: Sequence[str], output: Path, **kwargs) -> list[Path]:
    """`generate(pipe, prompts, **kwargs)`, writing each image to `image_file(output, index)` as its batch comes
    (on the main process only); returns the files, in image order."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    def save(first, images):
        for offset, image in enumerate(images):
            write_png(image_file(output, first + offset), image)

    images = generate(pipe, prompts, on_batch=save if distributed.is_main_process() else None, **kwargs)
    return [image_file(output, index) for index in range(len(images))]
