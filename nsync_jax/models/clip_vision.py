"""CLIP's image tower in Flax NNX, for the metrics: CMMD and CLIP score (transformers' CLIP) and CSD (style).

Models (float32; every forward runs at `Precision.HIGHEST`, see below):

* `CLIPVisionModelWithProjection`: transformers' class of that name. `model(pixels)` gives a `VisionOutput`:
  `pooled` `(batch, hidden)`, the final layer norm of the class token, and `image_embeds`
  `(batch, projection_dim)`, its projection (CMMD's features, before their L2 normalisation).
* `CLIPModel`: transformers' `CLIPModel` for CLIP score: `model.image_features(pixels)` and
  `model.text_features(input_ids)` are `CLIPModel.get_image_features` and `get_text_features`,
  `(batch, projection_dim)`, unnormalised. The text tower is `clip_text.CLIPTextModel`; `input_ids`
  `(batch, tokens)` with tokens <= `max_position_embeddings` (77), tokenised and truncated by the caller.
* `CSDStyleModel`: CSD's style embedding (learn2phoenix/CSD `CSD_CLIP`): the OpenAI ViT-L/14 image tower
  without its projection, then `last_layer_style` (1024 x 768) and an L2 normalisation; `model(pixels)`
  `(batch, 768)`.

Pixels are `(batch, image_size, image_size, channels)` float32, already resized and cropped (with PIL, on the
host) and normalised with `CLIP_MEAN`/`CLIP_STD`.

Loading (all or nothing; `UserError` naming the file and key):

* `load_clip_vision(folder)`: a transformers folder saved from `CLIPVisionModelWithProjection`, or from a
  full `CLIPModel` (its text tower is skipped), e.g. `openai/clip-vit-large-patch14-336` for CMMD.
* `load_clip_model(folder)`: a transformers `CLIPModel` folder, e.g. `openai/clip-vit-large-patch14`.
* `load_csd(folder)`: a folder written by `convert.convert_csd`.

OpenAI's and CSD's PyTorch files are converted to such folders by `nsync_jax.convert` (`nsync-jax
convert-weights`).

Precision: GPUs and TPUs multiply float32 in TF32/bf16 by default, which visibly perturbs CMMD (a difference of
kernel values near 1). The forward passes here run under `jax.default_matmul_precision("highest")`, which
reaches every product, attention included, when they are traced.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax import weights
from nsync_jax.errors import UserError
from nsync_jax.models.clip_text import (ENCODER_CONFIG_KEYS, CLIPEncoder, CLIPTextConfig, CLIPTextModel,
                                        check_heads, layer_norm, pooled_output, positive_int)

# OpenAI CLIP's image normalisation (what CLIPImageProcessor applies after the /255).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The key of CSD's style matrix in a folder written by `convert.convert_csd`.
STYLE_KEY = "style_projection.weight"

_VISION_SUPPORTED = {
    **ENCODER_CONFIG_KEYS,
    "num_channels": positive_int,
    "image_size": positive_int,  # transformers 5 also allows (height, width); CLIP checkpoints are square
    "patch_size": positive_int,
    "architectures": lambda v: v is None or v in (["CLIPVisionModel"], ["CLIPVisionModelWithProjection"]),
    "model_type": lambda v: v == "clip_vision_model",
}

# A CLIPModel config.json: the generic keys, its two towers' configs, and the shared projection size.
# `text_config_dict`/`vision_config_dict` are transformers 4.1x's spelling; see `CLIPConfig.from_dict`.
_CLIP_SUPPORTED = {
    **{k: ENCODER_CONFIG_KEYS[k] for k in ("initializer_factor", "dtype", "torch_dtype", "transformers_version",
                                           "output_attentions", "output_hidden_states", "return_dict",
                                           "tie_word_embeddings", "is_encoder_decoder", "id2label", "label2id",
                                           "problem_type", "pruned_heads", "torchscript", "use_bfloat16")},
    "architectures": lambda v: v is None or v == ["CLIPModel"],
    "model_type": lambda v: v == "clip",
    "projection_dim": positive_int,
    "logit_scale_init_value": lambda v: isinstance(v, (int, float)),
    "text_config": lambda v: v is None or isinstance(v, dict),
    "vision_config": lambda v: v is None or isinstance(v, dict),
    "text_config_dict": lambda v: v is None or isinstance(v, dict),
    "vision_config_dict": lambda v: v is None or isinstance(v, dict),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' `CLIPVisionConfig` that shape the model, with transformers' defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: Path | str = "config.json") -> "CLIPVisionConfig":
        """Validates a transformers `config.json` dict; `UserError` naming `source` and the key otherwise."""
        weights.check_config(config, _VISION_SUPPORTED, source)
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in fields and v is not None})
        check_heads(cfg, source)
        if cfg.patch_size > cfg.image_size:
            raise UserError(f"{source}: config patch_size={cfg.patch_size} is larger than "
                            f"image_size={cfg.image_size}")
        return cfg


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers' `CLIPConfig`: both towers, projected to `projection_dim` (`vision.projection_dim` too)."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: Path | str = "config.json") -> "CLIPConfig":
        """Validates a transformers CLIPModel `config.json` dict, its sub-configs included.

        As transformers does, a legacy `text_config_dict` (`vision_config_dict`) is completed with the
        defaults of its config class and then overrides `text_config` (`vision_config`) key by key.
        """
        weights.check_config(config, _CLIP_SUPPORTED, source)
        towers = {}
        for name, tower in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
            sub = dict(config.get(f"{name}_config") or {})
            legacy = config.get(f"{name}_config_dict")
            if legacy is not None:
                sub.update(dataclasses.asdict(tower.from_dict(legacy, f"{source}: {name}_config_dict")))
            towers[name] = tower.from_dict(sub, f"{source}: {name}_config")
        projection_dim = config.get("projection_dim", 512)
        return cls(towers["text"], dataclasses.replace(towers["vision"], projection_dim=projection_dim),
                   projection_dim)


def _highest_precision(method):
    """Runs `method` with float32 matrix products at full precision (no TF32/bf16 passes on GPU/TPU)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return method(*args, **kwargs)

    return wrapper


def _opts(rngs: nnx.Rngs) -> dict:
    return dict(param_dtype=jnp.float32, rngs=rngs)


class CLIPVisionEmbeddings(nnx.Module):
    """Patches (a strided convolution without bias), a learned class token first, learned positions."""

    def __init__(self, cfg: CLIPVisionConfig, opts: dict):
        patch = (cfg.patch_size, cfg.patch_size)
        self.patch_embedding = nnx.Conv(cfg.num_channels, cfg.hidden_size, kernel_size=patch, strides=patch,
                                        padding="VALID", use_bias=False, **opts)
        self.class_embedding = nnx.Param(jax.random.normal(opts["rngs"].params(), (cfg.hidden_size,)))
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nnx.Embed(num_positions, cfg.hidden_size, **opts)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """`(batch, height, width, channels)` -> `(batch, 1 + patches, hidden)`, patches in row-major order."""
        patches = self.patch_embedding(pixels)
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...], (patches.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...]


class CLIPVisionTransformer(nnx.Module):
    """transformers' `CLIPVisionTransformer` (`vision_model.*`): embeddings, `pre_layrnorm` (sic), the
    encoder without mask, and `post_layernorm` of the class token."""

    def __init__(self, config: CLIPVisionConfig, *, attention_backend: str = "auto", rngs: nnx.Rngs):
        opts = _opts(rngs)
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, opts)
        self.pre_layrnorm = layer_norm(config, opts)
        self.encoder = CLIPEncoder(config, causal=False, backend=attention_backend, opts=opts)
        self.post_layernorm = layer_norm(config, opts)

    @_highest_precision
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """The pooled output `(batch, hidden)` of normalised pixels `(batch, size, size, channels)`."""
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:3] != (size, size):
            raise ValueError(f"pixels of shape {pixels.shape}, but the image tower takes "
                             f"(batch, {size}, {size}, {self.config.num_channels}): resize on the host first")
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


class VisionOutput(NamedTuple):
    pooled: jax.Array  # (batch, hidden): the final layer norm of the class token
    image_embeds: jax.Array  # (batch, projection_dim): its projection


class CLIPVisionModelWithProjection(nnx.Module):
    """transformers' `CLIPVisionModelWithProjection`: the image tower and `visual_projection` (no bias)."""

    def __init__(self, config: CLIPVisionConfig, *, attention_backend: str = "auto", rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, attention_backend=attention_backend, rngs=rngs)
        self.visual_projection = nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False,
                                            **_opts(rngs))

    @_highest_precision
    def __call__(self, pixels: jax.Array) -> VisionOutput:
        pooled = self.vision_model(pixels)
        return VisionOutput(pooled, self.visual_projection(pooled))


class CLIPModel(nnx.Module):
    """transformers' `CLIPModel`: both towers, their projections (no bias) and `logit_scale` (the log of the
    logits' temperature; CLIP score does not use it)."""

    def __init__(self, config: CLIPConfig, *, attention_backend: str = "auto", rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextModel(config.text, dtype=jnp.float32, param_dtype=jnp.float32,
                                        attention_backend=attention_backend, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(config.vision, attention_backend=attention_backend, rngs=rngs)
        self.visual_projection = nnx.Linear(config.vision.hidden_size, config.projection_dim, use_bias=False,
                                            **_opts(rngs))
        self.text_projection = nnx.Linear(config.text.hidden_size, config.projection_dim, use_bias=False,
                                          **_opts(rngs))
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, jnp.float32))

    @_highest_precision
    def image_features(self, pixels: jax.Array) -> jax.Array:
        """`CLIPModel.get_image_features`: `(batch, projection_dim)`, not normalised."""
        return self.visual_projection(self.vision_model(pixels))

    @_highest_precision
    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """`CLIPModel.get_text_features` of `(batch, tokens)` ids: the state at the end-of-text token, projected;
        `(batch, projection_dim)`, not normalised."""
        hidden = self.text_model(input_ids)
        return self.text_projection(pooled_output(hidden, input_ids, self.config.text.eos_token_id))


def l2_normalize(x: jax.Array) -> jax.Array:
    """`x / max(|x|, 1e-12)` along the last axis, as `torch.nn.functional.normalize`."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CSDStyleModel(nnx.Module):
    """CSD's style embedding: the image tower's pooled output (no CLIP projection), times CSD's
    `last_layer_style` (stored transposed as `style_projection`), L2-normalised."""

    def __init__(self, config: CLIPVisionConfig, *, attention_backend: str = "auto", rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, attention_backend=attention_backend, rngs=rngs)
        self.style_projection = nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False,
                                           **_opts(rngs))

    @_highest_precision
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Unit style embeddings `(batch, projection_dim)` of normalised pixels."""
        return l2_normalize(self.style_projection(self.vision_model(pixels)))


# ------------------------------------------------------------------------------------------------ loading

def _ignored_keys(key: str) -> bool:
    # `position_ids`: buffers that checkpoints from before transformers 4.31 carry. The text tower, its
    # projection and `logit_scale`: the rest of a full CLIPModel file, when only the image tower is loaded.
    return (key.endswith("embeddings.position_ids") or key.startswith("text_model.")
            or key in ("text_projection.weight", "logit_scale"))


def _load(folder: Path, parse_config, build, ignored_keys=_ignored_keys) -> nnx.Module:
    return weights.load_model_folder(folder, parse_config=parse_config, build=build,
                                     weight_stems=weights.TRANSFORMERS_WEIGHTS, dtype=jnp.float32,
                                     ignored_keys=ignored_keys)


def _vision_config(config: dict, source: Path) -> CLIPVisionConfig:
    if config.get("model_type") == "clip":
        return CLIPConfig.from_dict(config, source).vision
    return CLIPVisionConfig.from_dict(config, source)


def load_clip_vision(folder: Path, *, attention_backend: str = "auto") -> CLIPVisionModelWithProjection:
    """Loads the image tower and its projection from a transformers `CLIPVisionModelWithProjection` or
    `CLIPModel` folder (config.json + model.safetensors or pytorch_model.bin)."""
    return _load(folder, _vision_config,
                 lambda cfg, rngs: CLIPVisionModelWithProjection(cfg, attention_backend=attention_backend,
                                                                 rngs=rngs))


def load_clip_model(folder: Path, *, attention_backend: str = "auto") -> CLIPModel:
    """Loads a transformers `CLIPModel` folder (both towers), for CLIP score."""
    return _load(folder, CLIPConfig.from_dict,
                 lambda cfg, rngs: CLIPModel(cfg, attention_backend=attention_backend, rngs=rngs),
                 ignored_keys=lambda key: key.endswith("embeddings.position_ids"))


def load_csd(folder: Path, *, attention_backend: str = "auto") -> CSDStyleModel:
    """Loads a folder written by `convert.convert_csd`."""
    return _load(folder, CLIPVisionConfig.from_dict,
                 lambda cfg, rngs: CSDStyleModel(cfg, attention_backend=attention_backend, rngs=rngs),
                 ignored_keys=lambda key: key.endswith("embeddings.position_ids"))
