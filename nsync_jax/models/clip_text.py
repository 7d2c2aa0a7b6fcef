"""transformers' `CLIPTextModel` (the Stable Diffusion text encoder) in Flax NNX.

The attribute tree is transformers', so `encoder.layers.3.mlp.fc1` loads into `encoder.layers[3].mlp.fc1`.
Checkpoints saved before transformers 5 (every released SD folder) prefix their keys with `text_model.`;
both spellings load. SD 1.x uses OpenAI's ViT-L/14 text tower (quick GELU); SD 2.x uses
OpenCLIP-H's (exact GELU) and conditions on the penultimate layer, which is `clip_skip=1` here, as in
diffusers' pipeline.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax import weights
from nsync_jax.models.attention import dot_product_attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
_anything = lambda v: True

# transformers' CLIPTextConfig keys. Dropout and initialisation settings do not change inference; the
# output/return flags are transformers' runtime switches, not architecture.
_SUPPORTED = {
    "vocab_size": _int,
    "hidden_size": _int,
    "intermediate_size": _int,
    "projection_dim": _int,
    "num_hidden_layers": _int,
    "num_attention_heads": _int,
    "max_position_embeddings": _int,
    "hidden_act": lambda v: v in ACTIVATIONS,
    "layer_norm_eps": _number,
    "attention_dropout": _number,
    "dropout": _number,
    "initializer_range": _number,
    "initializer_factor": _number,
    "pad_token_id": lambda v: v is None or _int(v),
    "bos_token_id": lambda v: v is None or _int(v),
    "eos_token_id": lambda v: v is None or _int(v),
    "architectures": lambda v: v is None or v == ["CLIPTextModel"],
    "model_type": lambda v: v == "clip_text_model",
    "dtype": _anything,
    "torch_dtype": _anything,
    "transformers_version": _anything,
    "output_attentions": _anything,
    "output_hidden_states": _anything,
    "return_dict": _anything,
    "use_cache": _anything,
    "tie_word_embeddings": _anything,
    "chunk_size_feed_forward": lambda v: v == 0,
    "is_encoder_decoder": lambda v: v is False,
    "id2label": _anything,
    "label2id": _anything,
    "problem_type": lambda v: v is None,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: Path | str = "config.json") -> "CLIPTextConfig":
        weights.check_config(config, _SUPPORTED, source)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields and v is not None})


class CLIPAttention(nnx.Module):
    def __init__(self, opts: dict, dim: int, heads: int, backend: str):
        self.heads = heads
        self.backend = backend
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(dim, dim, **opts) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    causal=True, backend=self.backend)
        return self.out_proj(out.reshape(x.shape))


class CLIPMLP(nnx.Module):
    def __init__(self, opts: dict, cfg: CLIPTextConfig):
        self.activation = cfg.hidden_act
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **opts)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **opts)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, opts: dict, cfg: CLIPTextConfig, backend: str):
        norm = lambda: nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **opts)
        self.layer_norm1 = norm()
        self.self_attn = CLIPAttention(opts, cfg.hidden_size, cfg.num_attention_heads, backend)
        self.layer_norm2 = norm()
        self.mlp = CLIPMLP(opts, cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, opts: dict, cfg: CLIPTextConfig, backend: str):
        self.layers = nnx.List([CLIPEncoderLayer(opts, cfg, backend) for _ in range(cfg.num_hidden_layers)])


class CLIPEmbeddings(nnx.Module):
    def __init__(self, opts: dict, cfg: CLIPTextConfig):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **opts)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **opts)


class CLIPTextModel(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        opts = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = CLIPEmbeddings(opts, cfg)
        self.encoder = CLIPEncoder(opts, cfg, attention_backend)
        self.final_layer_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **opts)

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 clip_skip: int = 0) -> jax.Array:
        """Hidden states `(batch, tokens, hidden)` after the final layer norm.

        Args:
          input_ids: `(batch, tokens)` token ids, or
          inputs_embeds: `(batch, tokens, hidden)` token embeddings (position embeddings are added here), so
            that a trainer can look up learned rows outside the frozen table.
          clip_skip: use the output of the layer `clip_skip` from the end (0: the last layer).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.token_embedding(input_ids)
        length = inputs_embeds.shape[1]
        positions = self.embeddings.position_embedding.embedding[...][:length]
        x = inputs_embeds + positions.astype(inputs_embeds.dtype)
        for layer in self.encoder.layers[: len(self.encoder.layers) - clip_skip]:
            x = layer(x)
        return self.final_layer_norm(x)


def pooled_output(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """transformers' `pooler_output`: the state at each sequence's first end-of-text token `(batch, hidden)`.

    Configs from before transformers 4.24 say `eos_token_id == 2`; those locate the end token as the largest id.
    """
    if eos_token_id == 2:
        position = jnp.argmax(input_ids, axis=-1)
    else:
        position = jnp.argmax(input_ids == eos_token_id, axis=-1)
    return hidden[jnp.arange(hidden.shape[0]), position]


def _strip_text_model_prefix(state: dict) -> dict:
    return {key.removeprefix("text_model."): value for key, value in state.items()}


def load_text_encoder(folder: Path, *, dtype=jnp.float32, param_dtype=None, attention_backend: str = "auto"
                      ) -> CLIPTextModel:
    """Loads a transformers `text_encoder/` folder (config.json + model.safetensors or pytorch_model.bin)."""
    param_dtype = param_dtype or dtype
    return weights.load_model_folder(
        folder, parse_config=CLIPTextConfig.from_dict, weight_stems=weights.TRANSFORMERS_WEIGHTS,
        dtype=param_dtype, rename_keys=_strip_text_model_prefix,
        # A buffer that older checkpoints carry; it holds no parameter.
        ignored_keys=lambda key: key == "embeddings.position_ids",
        build=lambda cfg, rngs: CLIPTextModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                              attention_backend=attention_backend, rngs=rngs))
