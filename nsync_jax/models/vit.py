"""transformers' `ViTModel` in Flax NNX, for DINO-ViT's structure distance (`nsync_jax.edit_metrics`).

DINO ViT-B/8 (`facebook/dino-vitb8`, or DINO's own `dino_vitbase8_pretrain.pth` converted by
`nsync_jax.convert.convert_dino`) is a plain pre-LN ViT: patches by a strided convolution with bias, a learned
class token first, learned positions, then the encoder. Its layers compute what CLIP's do (layer norm,
attention with biased q/k/v, residual; layer norm, GELU MLP, residual), so the encoder is
`clip_text.CLIPEncoder`; `load_vit` renames transformers' ViT keys (`encoder.layer.3.attention.attention.key`)
to CLIP's (`encoder.layers.3.self_attn.k_proj`) on the way in.

`ViTModel.last_layer_keys(pixels)` is what Splice (Tumanyan et al., "Splicing ViT Features") takes as the
image's structure: the key projections of the last layer's input, every token (class token first), heads
concatenated, `(batch, 1 + patches, hidden)`. Pixels are `(batch, image_size, image_size, channels)`, resized on
the host and normalised with `IMAGENET_MEAN`/`IMAGENET_STD`; no position interpolation, so the size must be
the config's. Products run at `Precision.HIGHEST` (no TF32/bf16 passes on GPUs and TPUs), as the other metric
networks'.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax import weights
from nsync_jax.errors import UserError
from nsync_jax.models.clip_text import ENCODER_CONFIG_KEYS, CLIPEncoder, check_heads, layer_norm, positive_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
_SUPPORTED = {
    **ENCODER_CONFIG_KEYS,
    "num_channels": positive_int,
    "image_size": positive_int,  # transformers also allows (height, width); DINO's checkpoints are square
    "patch_size": positive_int,
    "qkv_bias": lambda v: v is True,
    "hidden_dropout_prob": lambda v: _number(v) and v >= 0,  # training-time regularisers, as in clip_text
    "attention_probs_dropout_prob": lambda v: _number(v) and v >= 0,
    "encoder_stride": positive_int,  # read only by ViTForMaskedImageModeling's decoder
    "pooler_act": lambda v: True,  # the pooler is not built: its weights are skipped on load
    "pooler_output_size": lambda v: v is None or positive_int(v),
    "architectures": lambda v: v is None or v == ["ViTModel"],
    "model_type": lambda v: v == "vit",
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The fields of transformers' `ViTConfig` that shape the model, with transformers' defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: Path | str = "config.json") -> "ViTConfig":
        """Validates a transformers `config.json` dict; `UserError` naming `source` and the key otherwise."""
        weights.check_config(config, _SUPPORTED, source)
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in fields and v is not None})
        check_heads(cfg, source)
        if cfg.image_size % cfg.patch_size:
            raise UserError(f"{source}: config patch_size={cfg.patch_size} does not divide "
                            f"image_size={cfg.image_size}")
        return cfg


class PatchEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, opts: dict):
        patch = (cfg.patch_size, cfg.patch_size)
        self.projection = nnx.Conv(cfg.num_channels, cfg.hidden_size, kernel_size=patch, strides=patch,
                                   padding="VALID", **opts)


class ViTEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, opts: dict):
        tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.cls_token = nnx.Param(jnp.zeros((1, 1, cfg.hidden_size), jnp.float32))
        self.position_embeddings = nnx.Param(jnp.zeros((1, tokens, cfg.hidden_size), jnp.float32))
        self.patch_embeddings = PatchEmbeddings(cfg, opts)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """`(batch, height, width, channels)` -> `(batch, 1 + patches, hidden)`, patches in row-major order."""
        patches = self.patch_embeddings.projection(pixels)
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...], (patches.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embeddings[...]


class ViTModel(nnx.Module):
    """transformers' `ViTModel` without its pooler: embeddings, encoder, final `layernorm`."""

    def __init__(self, config: ViTConfig, *, attention_backend: str = "auto", rngs: nnx.Rngs):
        opts = dict(param_dtype=jnp.float32, rngs=rngs)
        self.config = config
        self.embeddings = ViTEmbeddings(config, opts)
        self.encoder = CLIPEncoder(config, causal=False, backend=attention_backend, opts=opts)
        self.layernorm = layer_norm(config, opts)

    def _check(self, pixels: jax.Array) -> None:
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:3] != (size, size):
            raise ValueError(f"pixels of shape {pixels.shape}, but the ViT takes "
                             f"(batch, {size}, {size}, {self.config.num_channels}): resize on the host first")

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """`last_hidden_state` `(batch, 1 + patches, hidden)`, after the final layer norm."""
        self._check(pixels)
        with jax.default_matmul_precision("highest"):
            return self.layernorm(self.encoder(self.embeddings(pixels)))

    def last_layer_keys(self, pixels: jax.Array) -> jax.Array:
        """The last layer's attention keys `(batch, 1 + patches, hidden)`, heads concatenated (Splice's)."""
        self._check(pixels)
        with jax.default_matmul_precision("highest"):
            x = self.encoder(self.embeddings(pixels), num_layers=self.config.num_hidden_layers - 1)
            last = self.encoder.layers[-1]
            return last.self_attn.k_proj(last.layer_norm1(x))


# transformers' ViT names -> CLIPEncoder's, per layer.
_LAYER_RENAMES = {"attention.attention.query": "self_attn.q_proj", "attention.attention.key": "self_attn.k_proj",
                  "attention.attention.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
                  "layernorm_before": "layer_norm1", "layernorm_after": "layer_norm2",
                  "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def to_encoder_names(state: dict) -> dict:
    """A ViTModel state dict (optionally `vit.`-prefixed, as ViT classifiers save it) in this module's names."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        if (m := _LAYER_KEY.match(key)) and m.group(2) in _LAYER_RENAMES:
            key = f"encoder.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"
        out[key] = value
    return out


def load_vit(folder: Path, *, attention_backend: str = "auto") -> ViTModel:
    """Loads a transformers `ViTModel` folder (config.json + model.safetensors or pytorch_model.bin), e.g.
    `facebook/dino-vitb8`; the pooler's weights, if saved, are skipped (nothing here reads the pooler)."""
    return weights.load_model_folder(
        folder, parse_config=ViTConfig.from_dict, weight_stems=weights.TRANSFORMERS_WEIGHTS, dtype=jnp.float32,
        rename_keys=to_encoder_names, ignored_keys=lambda key: key.startswith("pooler."),
        build=lambda cfg, rngs: ViTModel(cfg, attention_backend=attention_backend, rngs=rngs))
