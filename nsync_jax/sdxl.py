"""A loaded Stable Diffusion XL folder and SDXL's conditioning: two text encoders, pooled text, micro-conditioning.

A diffusers SDXL folder is a Stable Diffusion folder with a second text encoder and tokenizer (`text_encoder_2/`, a
`CLIPTextModelWithProjection`; `tokenizer_2/`, which pads with its own pad token, "!" in SDXL base) and a UNet with
`addition_embed_type="text_time"`. It is told apart by its `model_index.json`, never by a flag. The UNet is
conditioned on
- `prompt_embeds` `(batch, tokens, width_1 + width_2)`: both encoders' penultimate layers, without their final
  layer norm, side by side (diffusers' `StableDiffusionXLPipeline.encode_prompt`);
- `text_embeds` `(batch, projection_dim)`: encoder 2's pooled output through its projection;
- `time_ids` `(batch, 6)`: original size, crop top-left, target size, each (height, width) or (top, left).

`StableDiffusionXL` is a `pipeline.Pipeline`: `load_pipeline` returns it for SDXL folders and `sampling.generate`
draws with it through `SDXLConditioner`, in the same loop as SD.
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
from nsync_jax.models.vae import AutoencoderKL, VAEConfig, load_vae
from nsync_jax.pipeline import MICRO_CONDITIONING, Pipeline

PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")
# Three (height, width)-like pairs: original size, crop top-left, target size.
NUM_TIME_IDS = 6


def is_sdxl_folder(folder: Path) -> bool:
    """Whether a diffusers folder holds an SDXL pipeline: its `model_index.json` names a second text encoder."""
    return "text_encoder_2" in weights.read_json(Path(folder) / "model_index.json")


@dataclasses.dataclass(frozen=True)
class SDXLConditioner:
    """How an SDXL UNet is conditioned on token ids (diffusers' `StableDiffusionXLPipeline`): both encoders' states,
    the pooled embedding and `extras["time_ids"]`, `(6,)` for every image or `(batch, 6)` one per image. The sampling
    loop calls it with token ids and learned rows; the training step (`from_embeds`) with the input embeddings what
    is trained gives. `clip_skip` applies to the prompt only; `zero_negative`: the negative branch is all zeros
    (diffusers' `force_zeros_for_empty_prompt`)."""
    clip_skip: int = 0
    zero_negative: bool = False
    encoders = ("text_encoder", "text_encoder_2")

    def __call__(self, encoders: dict[str, CLIPTextModel], extra_token_rows: tuple[jax.Array, jax.Array],
                 ids: tuple[jax.Array, jax.Array], extras: dict, *, negative: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        embeds = embed_ids([encoders[name] for name in self.encoders], ids, extra_token_rows)
        return self.from_embeds(encoders, embeds, ids, extras, negative=negative)

    def from_embeds(self, encoders: dict[str, CLIPTextModel], embeds, ids, extras: dict, *, negative: bool = False
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`(context, added_cond)` from each encoder's input embeddings `embeds` and token ids `ids` (in the order
        of `encoders`; encoder 2's ids place its pooled token)."""
        embeds, pooled = encode_embeds(encoders["text_encoder"], encoders["text_encoder_2"], *embeds, ids[1],
                                       clip_skip=0 if negative else self.clip_skip)
        if negative and self.zero_negative:
            embeds, pooled = jnp.zeros_like(embeds), jnp.zeros_like(pooled)
        return embeds, {"text_embeds": pooled,
                        "time_ids": jnp.broadcast_to(extras["time_ids"], (len(pooled), NUM_TIME_IDS))}


@dataclasses.dataclass
class StableDiffusionXL(Pipeline):
    folder: Path
    tokenizer: Any
    tokenizer_2: Any
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    # model_index.json's `force_zeros_for_empty_prompt`: an empty negative prompt conditions on zeros.
    force_zeros_for_empty_prompt: bool = True
    # Learned rows of each encoder past its table (`pipeline.StableDiffusion.extra_token_rows`), same tokens.
    extra_token_rows: tuple[np.ndarray, np.ndarray] = ()

    def __post_init__(self):
        if not self.extra_token_rows:
            self.extra_token_rows = tuple(np.zeros((0, encoder.config.hidden_size), np.float32)
                                          for encoder in (self.text_encoder, self.text_encoder_2))

    def modules(self) -> dict[str, nnx.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "unet": self.unet,
                "vae": self.vae}

    def tokenize(self, prompts: list[str], prompts_2: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids for each encoder, `(batch, model_max_length)` each, each tokenizer padding with its own pad
        token; `prompts_2` (diffusers' `prompt_2`) defaults to `prompts`."""
        return tokens.tokenize(self.tokenizer, prompts), tokens.tokenize(self.tokenizer_2, prompts_2 or prompts)

    def token_ids(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Both encoders' ids for the same prompts, multi-vector learned tokens written out."""
        return tuple(tokens.tokenize(t, [tokens.expand_placeholders(p, t) for p in prompts])
                     for t in (self.tokenizer, self.tokenizer_2))

    def sampling_conditioning(self, settings, negative_prompt: str, height: int, width: int
                              ) -> tuple[SDXLConditioner, dict[str, np.ndarray]]:
        """The loop's conditioner and `time_ids` for `sampling.SampleSettings`: diffusers' defaults are the output
        size as original and target size, crop (0, 0)."""
        original, crop, target = (getattr(settings, name) for name in MICRO_CONDITIONING)
        conditioner = SDXLConditioner(settings.clip_skip, self.force_zeros_for_empty_prompt and not negative_prompt)
        return conditioner, {"time_ids": time_ids(original or (height, width), crop or (0, 0),
                                                  target or (height, width))}

    def add_embeddings(self, path: Path) -> list[str]:
        """Adds the tokens of an SDXL embedding file (`clip_l`, `clip_g`: one token, named by the file's stem) to
        both tokenizers and encoders, all or none; returns their names."""
        learned = tokens.load_sdxl_embeddings(Path(path))
        pairs = list(zip((self.tokenizer, self.tokenizer_2), (self.text_encoder, self.text_encoder_2), learned,
                         self.extra_token_rows))
        for _, encoder, embeddings, _ in pairs:  # both checked before either tokenizer changes
            tokens.check_embedding_widths(embeddings, encoder.config.hidden_size, source=path)
        self.extra_token_rows = tuple(
            tokens.append_learned_rows(tokenizer, encoder.embeddings.token_embedding.embedding[...], rows,
                                       embeddings, source=path) for tokenizer, encoder, embeddings, rows in pairs)
        return list(learned[0])


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
    vae_config = VAEConfig.from_dict(weights.read_json(folder / "vae" / "config.json"), folder / "vae" / "config.json")
    vae_dtype = jnp.float32 if vae_config.force_upcast else dtype  # float32 decodes whatever the compute dtype
    sdxl = StableDiffusionXL(
        folder=folder,
        tokenizer=tokens.load_tokenizer(folder / "tokenizer"),
        tokenizer_2=tokens.load_tokenizer(folder / "tokenizer_2"),
        text_encoder=load_text_encoder(folder / "text_encoder", **options),
        text_encoder_2=load_text_encoder(folder / "text_encoder_2", with_projection=True, **options),
        unet=load_unet(folder / "unet", **options),
        vae=load_vae(folder / "vae", dtype=vae_dtype, attention_backend=attention_backend, variant=variant),
        scheduler_config=weights.read_json(folder / "scheduler" / "scheduler_config.json"),
        force_zeros_for_empty_prompt=weights.read_json(folder / "model_index.json").get(
            "force_zeros_for_empty_prompt", True),
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


def embed_ids(encoders, ids, extra_token_rows=None) -> list[jax.Array]:
    """Each encoder's input embeddings of its token ids; ids past its table select its learned rows (None: none)."""
    embeds = []
    for encoder, encoder_ids, rows in zip(encoders, ids, extra_token_rows or (None,) * len(encoders)):
        table = encoder.embeddings.token_embedding.embedding[...]
        rows = jnp.zeros((0, table.shape[1]), table.dtype) if rows is None else rows.astype(table.dtype)
        embeds.append(tokens.embed_tokens(table, rows, encoder_ids))
    return embeds


def encode_prompt(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, ids: jax.Array,
                  ids_2: jax.Array, *, extra_token_rows: tuple[jax.Array, jax.Array] | None = None,
                  clip_skip: int = 0) -> tuple[jax.Array, jax.Array]:
    """`(prompt_embeds (batch, tokens, width_1 + width_2), pooled_prompt_embeds (batch, projection_dim))`, as
    diffusers' `StableDiffusionXLPipeline.encode_prompt` for one prompt batch.

    `ids`, `ids_2` are each tokenizer's ids (`StableDiffusionXL.tokenize`); ids past an encoder's table select its
    `extra_token_rows` (learned tokens, as `pipeline.encode_text`). `clip_skip` counts layers back from the
    penultimate one, which SDXL always starts from.
    """
    embeds = embed_ids((text_encoder, text_encoder_2), (ids, ids_2), extra_token_rows)
    return encode_embeds(text_encoder, text_encoder_2, *embeds, ids_2, clip_skip=clip_skip)


def encode_embeds(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, embeds: jax.Array,
                  embeds_2: jax.Array, ids_2: jax.Array, *, clip_skip: int = 0) -> tuple[jax.Array, jax.Array]:
    """`encode_prompt` from each encoder's input embeddings `(batch, tokens, width)`; `ids_2` places the pooled
    token (encoder 2's end-of-text)."""
    encoders = (text_encoder, text_encoder_2)
    fewest_layers = min(len(encoder.encoder.layers) for encoder in encoders)
    if not 0 <= clip_skip < fewest_layers:
        raise UserError(f"clip_skip={clip_skip} is out of range: SDXL's text encoders have {fewest_layers} layers "
                        f"or more (use 0 to {fewest_layers - 1})")
    states = [encoder.hidden_states(inputs_embeds=e) for encoder, e in zip(encoders, (embeds, embeds_2))]
    prompt_embeds = jnp.concatenate([s[-(clip_skip + 2)] for s in states], axis=-1)
    pooled = text_encoder_2.text_embeds(text_encoder_2.final_layer_norm(states[1][-1]), ids_2)
    return prompt_embeds, pooled


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
             target_size: tuple[int, int]) -> np.ndarray:
    """SDXL's micro-conditioning `(6,)` float32, as diffusers' `_get_add_time_ids`: original (height, width), crop
    (top, left), target (height, width). diffusers' defaults are the output size, (0, 0), the output size."""
    return np.asarray([*original_size, *crop_top_left, *target_size], np.float32)


def image_time_ids(crops: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """Each training image's micro-conditioning `(..., 6)` float32 from its `style_dataset.crop_record` rows
    `(..., 4)` (original size, crop top-left) and the training size, as diffusers' SDXL training scripts."""
    target = np.broadcast_to(np.asarray(target_size, np.float32), (*crops.shape[:-1], 2))
    return np.concatenate([crops.astype(np.float32), target], axis=-1)
