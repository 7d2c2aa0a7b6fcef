"""A loaded Stable Diffusion XL folder and SDXL's conditioning: two text encoders, pooled text, micro-conditioning.

A diffusers SDXL folder is a Stable Diffusion folder with a second text encoder and tokenizer (`text_encoder_2/`, a
`CLIPTextModelWithProjection`; `tokenizer_2/`, which pads with its own pad token, "!" in SDXL base) and a UNet with
`addition_embed_type="text_time"`. It is told apart by its `model_index.json`, never by a flag. The UNet is
conditioned on
- `prompt_embeds` `(batch, tokens, width_1 + width_2)`: both encoders' penultimate layers, without their final
  layer norm, side by side (diffusers' `StableDiffusionXLPipeline.encode_prompt`);
- `text_embeds` `(batch, projection_dim)`: encoder 2's pooled output through its projection;
- `time_ids` `(batch, 6)`: original size, crop top-left, target size, each (height, width) or (top, left).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsync_jax import tokens, weights
from nsync_jax.errors import UserError
from nsync_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection, load_text_encoder
from nsync_jax.models.unet import UNet2DConditionModel, load_unet
from nsync_jax.models.vae import AutoencoderKL, load_vae

PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")
# Three (height, width)-like pairs: original size, crop top-left, target size.
NUM_TIME_IDS = 6


def is_sdxl_folder(folder: Path) -> bool:
    """Whether a diffusers folder holds an SDXL pipeline: its `model_index.json` names a second text encoder."""
    return "text_encoder_2" in weights.read_json(Path(folder) / "model_index.json")


@dataclasses.dataclass
class StableDiffusionXL:
    folder: Path
    tokenizer: Any
    tokenizer_2: Any
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]

    def modules(self) -> dict[str, nnx.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "unet": self.unet,
                "vae": self.vae}

    def tokenize(self, prompts: list[str], prompts_2: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids for each encoder, `(batch, model_max_length)` each, each tokenizer padding with its own pad
        token; `prompts_2` (diffusers' `prompt_2`) defaults to `prompts`."""
        return tokens.tokenize(self.tokenizer, prompts), tokens.tokenize(self.tokenizer_2, prompts_2 or prompts)


def load_sdxl(folder: str | Path, *, dtype=jnp.float32, attention_backend: str = "auto", param_dtype=None,
              variant: str | None = None) -> StableDiffusionXL:
    """Loads every part of a diffusers SDXL folder, failing on the first missing or bad part.

    `dtype` is the compute dtype; the text encoders and UNet keep their parameters in `param_dtype` (default:
    `dtype`), the VAE in `dtype`.
    """
    folder = Path(folder)
    if not is_sdxl_folder(folder):
        raise UserError(f"{folder}: not a Stable Diffusion XL folder (model_index.json names no text_encoder_2)")
    for part in PARTS:
        if not (folder / part).is_dir():
            raise UserError(f"{folder}: subfolder {part}/ missing (a diffusers SDXL folder needs {', '.join(PARTS)})")
    options = dict(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend, variant=variant)
    sdxl = StableDiffusionXL(
        folder=folder,
        tokenizer=tokens.load_tokenizer(folder / "tokenizer"),
        tokenizer_2=tokens.load_tokenizer(folder / "tokenizer_2"),
        text_encoder=load_text_encoder(folder / "text_encoder", **options),
        text_encoder_2=load_text_encoder(folder / "text_encoder_2", with_projection=True, **options),
        unet=load_unet(folder / "unet", **options),
        vae=load_vae(folder / "vae", dtype=dtype, attention_backend=attention_backend, variant=variant),
        scheduler_config=weights.read_json(folder / "scheduler" / "scheduler_config.json"),
    )
    _check_widths(sdxl)
    return sdxl


def _check_widths(sdxl: StableDiffusionXL) -> None:
    """The UNet's conditioning widths against what the two encoders give (diffusers checks the pooled part only
    when sampling, in `_get_add_time_ids`)."""
    unet, config = sdxl.folder / "unet" / "config.json", sdxl.unet.config
    if config.addition_embed_type != "text_time":
        raise UserError(f"{unet}: config addition_embed_type={config.addition_embed_type!r}; an SDXL UNet has "
                        "'text_time'")
    widths = sdxl.text_encoder.config.hidden_size, sdxl.text_encoder_2.config.hidden_size
    if config.cross_attention_dim != sum(widths):
        raise UserError(f"{unet}: config cross_attention_dim={config.cross_attention_dim}, but the two text "
                        f"encoders' states are {widths[0]} + {widths[1]} wide")
    pooled = sdxl.text_encoder_2.config.projection_dim + NUM_TIME_IDS * config.addition_time_embed_dim
    if config.projection_class_embeddings_input_dim != pooled:
        raise UserError(f"{unet}: config projection_class_embeddings_input_dim="
                        f"{config.projection_class_embeddings_input_dim}, but text_encoder_2's projection_dim and "
                        f"{NUM_TIME_IDS} time ids of addition_time_embed_dim={config.addition_time_embed_dim} "
                        f"make {pooled}")


def encode_prompt(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, ids: jax.Array,
                  ids_2: jax.Array, *, extra_token_rows: tuple[jax.Array, jax.Array] | None = None,
                  clip_skip: int = 0) -> tuple[jax.Array, jax.Array]:
    """`(prompt_embeds (batch, tokens, width_1 + width_2), pooled_prompt_embeds (batch, projection_dim))`, as
    diffusers' `StableDiffusionXLPipeline.encode_prompt` for one prompt batch.

    `ids`, `ids_2` are each tokenizer's ids (`StableDiffusionXL.tokenize`); ids past an encoder's table select its
    `extra_token_rows` (learned tokens, as `pipeline.encode_text`). `clip_skip` counts layers back from the
    penultimate one, which SDXL always starts from.
    """
    encoders = (text_encoder, text_encoder_2)
    fewest_layers = min(len(encoder.encoder.layers) for encoder in encoders)
    if not 0 <= clip_skip < fewest_layers:
        raise UserError(f"clip_skip={clip_skip} is out of range: SDXL's text encoders have {fewest_layers} layers "
                        f"or more (use 0 to {fewest_layers - 1})")
    states = []
    for encoder, encoder_ids, rows in zip(encoders, (ids, ids_2), extra_token_rows or (None, None)):
        table = encoder.embeddings.token_embedding.embedding[...]
        rows = jnp.zeros((0, table.shape[1]), table.dtype) if rows is None else rows.astype(table.dtype)
        states.append(encoder.hidden_states(inputs_embeds=tokens.embed_tokens(table, rows, encoder_ids)))
    prompt_embeds = jnp.concatenate([s[-(clip_skip + 2)] for s in states], axis=-1)
    pooled = text_encoder_2.text_embeds(text_encoder_2.final_layer_norm(states[1][-1]), ids_2)
    return prompt_embeds, pooled


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
             target_size: tuple[int, int]) -> np.ndarray:
    """SDXL's micro-conditioning `(6,)` float32, as diffusers' `_get_add_time_ids`: original (height, width), crop
    (top, left), target (height, width). diffusers' defaults are the output size, (0, 0), the output size."""
    return np.asarray([*original_size, *crop_top_left, *target_size], np.float32)
