"""A loaded Stable Diffusion folder: the three Flax modules, the tokenizer and the scheduler config.

`load_pipeline` returns a `StableDiffusion`, or for an SDXL folder (told apart by its model_index.json) a
`sdxl.StableDiffusionXL`; both are a `Pipeline`, which tells the sampling loop how its prompts condition the UNet
(`token_ids`, `sampling_conditioning`), so SD and SDXL share one denoising loop.

`load_pipeline` reads a diffusers-format folder (`model_index.json`, `text_encoder/`, `tokenizer/`, `unet/`,
`vae/`, `scheduler/`), local or fetched from the Hugging Face Hub (`sources.resolve_model`), optionally with
another model's VAE in place of its own (`vae=`, `sources.resolve_vae`). Learned token
embeddings (Textual Inversion, NSYNC) are kept apart from the frozen embedding table as `extra_token_rows`, so the
frozen weights never change and only those rows are trained.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsync_jax import sources, tokens, weights
from nsync_jax.errors import UserError
from nsync_jax.models.clip_text import CLIPTextModel, load_text_encoder
from nsync_jax.models.unet import UNet2DConditionModel, load_unet
from nsync_jax.models.vae import AutoencoderKL, VAEConfig, load_vae

PARTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
# SDXL's micro-conditioning settings (`sampling.SampleSettings` fields, the CLI's flags with dashes).
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")


class Pipeline:
    """What every loaded model has and derives. Each kind also gives `modules()` (name -> module),
    `extra_token_rows` (learned rows, a pytree), `add_embeddings(path)`, `token_ids(prompts)` and
    `sampling_conditioning(...)` (the sampling loop's conditioner and its array inputs)."""
    folder: Path
    tokenizer: Any
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor


@dataclasses.dataclass(frozen=True)
class TextConditioner:
    """How the sampling loop conditions the UNet on token ids: SD 1.x/2.x's one text encoder's states, with
    `clip_skip` on both guidance branches. Static (hashable): part of the compiled loop's identity."""
    clip_skip: int = 0
    encoders = ("text_encoder",)

    def __call__(self, encoders: dict[str, CLIPTextModel], extra_token_rows: jax.Array, ids: jax.Array,
                 extras: dict, *, negative: bool) -> tuple[jax.Array, None]:
        """`(context, added_cond)` for the UNet; SD has no added conditioning and no `extras`."""
        return encode_text(encoders["text_encoder"], extra_token_rows, ids, clip_skip=self.clip_skip), None

    def from_embeds(self, encoders: dict[str, CLIPTextModel], embeds, ids, extras: dict) -> tuple[jax.Array, None]:
        """`(context, None)` from the text encoder's input embeddings `embeds[0]` (the training step's, embedded by
        what is trained); an SD UNet has no micro-conditioning, so `extras` must be empty."""
        if extras:
            raise ValueError(f"{', '.join(extras)}: SDXL's conditioning; a Stable Diffusion 1.x/2.x UNet takes none")
        return encoders["text_encoder"](inputs_embeds=embeds[0], clip_skip=self.clip_skip), None


@dataclasses.dataclass
class StableDiffusion(Pipeline):
    folder: Path
    tokenizer: Any
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    # Learned embeddings appended after the tokenizer's base vocabulary: row i is token id `base_vocab + i`.
    extra_token_rows: np.ndarray

    def modules(self) -> dict[str, nnx.Module]:
        return {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}

    def token_ids(self, prompts: list[str]) -> np.ndarray:
        """Token ids `(len(prompts), model_max_length)`, multi-vector learned tokens written out."""
        return tokens.tokenize(self.tokenizer, [tokens.expand_placeholders(p, self.tokenizer) for p in prompts])

    def sampling_conditioning(self, settings, negative_prompt: str, height: int, width: int
                              ) -> tuple[TextConditioner, dict]:
        """The loop's conditioner and its array inputs for `sampling.SampleSettings`; SDXL's micro-conditioning
        is refused (this UNet has none)."""
        given = [name for name in MICRO_CONDITIONING if getattr(settings, name) is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} is SDXL's micro-conditioning; {self.folder} is a "
                            "Stable Diffusion 1.x/2.x model")
        return TextConditioner(settings.clip_skip), {}

    def add_embeddings(self, path: Path) -> list[str]:
        """Adds the tokens of a diffusers or A1111 embedding file (all or none); returns their names."""
        learned = tokens.load_learned_embeddings(Path(path))
        self.extra_token_rows = tokens.append_learned_rows(
            self.tokenizer, self.text_encoder.embeddings.token_embedding.embedding[...], self.extra_token_rows,
            learned, source=path)
        return list(learned)


def load_pipeline(folder: str | Path, *, dtype=jnp.float32, attention_backend: str = "auto", param_dtype=None,
                  revision: str | None = None, variant: str | None = None,
                  model_config: str | Path | None = None,
                  vae: str | Path | None = None, allow_sdxl: bool = False) -> Pipeline:
    """Loads every part of a diffusers Stable Diffusion or SDXL model, failing on the first missing or bad part.

    `folder` is a diffusers folder or a Hugging Face Hub id (`org/name`) at `revision`, fetched into the Hugging
    Face cache (`sources.resolve_model`); `variant` (e.g. "fp16") picks the weight files of that variant. It may
    also be a single-file checkpoint (`.safetensors`, `.ckpt`), converted once; `model_config` then names its
    architecture's configs when they are not the detected ones.
    `dtype` is the compute dtype; the text encoder and UNet keep their parameters in `param_dtype` (default:
    `dtype`; float32 master weights for bfloat16 training), the VAE in `dtype`. `vae` names a replacement VAE
    (a VAE folder, a model folder with vae/, or a Hub id such as stabilityai/sd-vae-ft-mse); it must be a drop-in
    for the model's own: the same architecture, latent channels and scaling factor. An SDXL folder gives a
    `sdxl.StableDiffusionXL` where the caller handles one (`allow_sdxl`), else a one-line error.
    """
    from nsync_jax import sdxl  # it builds on this module

    folder = sources.resolve_model(folder, revision=revision, variant=variant, model_config=model_config)
    if sdxl.is_sdxl_folder(folder):
        if not allow_sdxl:
            raise UserError(f"{folder}: a Stable Diffusion XL folder; on SDXL only sample, negatives and token "
                            "training (textual_inversion, nsync) work yet")
        loaded = sdxl.load_sdxl(folder, dtype=dtype, attention_backend=attention_backend, param_dtype=param_dtype,
                                variant=variant)
        if vae:
            loaded.vae = load_replacement_vae(vae, folder, loaded.vae.decoder.conv_in.kernel[...].dtype,
                                              attention_backend)
        return loaded
    for part in PARTS:
        if not (folder / part).is_dir():
            raise UserError(f"{folder}: subfolder {part}/ missing (a diffusers Stable Diffusion folder needs "
                            f"{', '.join(PARTS)})")
    scheduler_config = weights.read_json(folder / "scheduler" / "scheduler_config.json")
    text_encoder = load_text_encoder(folder / "text_encoder", dtype=dtype, param_dtype=param_dtype,
                                     attention_backend=attention_backend, variant=variant)
    return StableDiffusion(
        folder=folder,
        tokenizer=tokens.load_tokenizer(folder / "tokenizer"),
        text_encoder=text_encoder,
        unet=load_unet(folder / "unet", dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend,
                       variant=variant),
        vae=load_replacement_vae(vae, folder, dtype, attention_backend) if vae else
        load_vae(folder / "vae", dtype=dtype, attention_backend=attention_backend, variant=variant),
        scheduler_config=scheduler_config,
        extra_token_rows=np.zeros((0, text_encoder.config.hidden_size), np.float32),
    )


def load_replacement_vae(reference: str | Path, model_folder: Path, dtype, attention_backend: str) -> AutoencoderKL:
    """Another model's VAE, refused unless its latents are the model's: same architecture and scaling."""
    folder = sources.resolve_vae(reference)
    config = VAEConfig.from_dict(weights.read_json(folder / "config.json"), folder / "config.json")
    own_path = model_folder / "vae" / "config.json"
    for key, value in dataclasses.asdict(VAEConfig.from_dict(weights.read_json(own_path), own_path)).items():
        if key != "force_upcast" and getattr(config, key) != value:  # where to decode, not what
            raise UserError(f"{folder / 'config.json'}: {key}={getattr(config, key)!r} differs from the model's "
                            f"{key}={value!r} ({own_path}); a replacement VAE must be a drop-in for the model's own")
    return load_vae(folder, dtype=dtype, attention_backend=attention_backend)


def encode_text(text_encoder: CLIPTextModel, extra_token_rows: jax.Array, ids: jax.Array, *,
                clip_skip: int = 0) -> jax.Array:
    """Text encoder states `(batch, tokens, hidden)` for token ids that may include learned tokens.

    Gradients with respect to `extra_token_rows` flow only into the rows the ids use.
    """
    table = text_encoder.embeddings.token_embedding.embedding[...]
    embeds = tokens.embed_tokens(table, extra_token_rows.astype(table.dtype), ids)
    return text_encoder(inputs_embeds=embeds, clip_skip=clip_skip)
