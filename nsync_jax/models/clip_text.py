"""transformers' `CLIPTextModel` (the Stable Diffusion text encoder) in Flax NNX.

The attribute tree is transformers', so `encoder.layers.3.mlp.fc1` loads into `encoder.layers[3].mlp.fc1`.
Checkpoints saved before transformers 5 (every released SD folder) prefix their keys with `text_model.`;
both spellings load. SD 1.x uses OpenAI's ViT-L/14 text tower (quick GELU); SD 2.x uses OpenCLIP-H's
(exact GELU) and conditions on the penultimate layer, which is `clip_skip=1` here, as in diffusers' pipeline.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax import weights
from nsync_jax.errors import UserError
from nsync_jax.models.attention import dot_product_attention

# transformers' ACT2FN entries, exactly: "gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_positive_int = lambda v: _int(v) and v > 0
_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
_optional_int = lambda v: v is None or _int(v)
_optional_bool = lambda v: v is None or isinstance(v, bool)
_optional_str = lambda v: v is None or isinstance(v, str)
_anything = lambda v: True

# Every key transformers writes for a CLIPTextConfig (5.x writes all of them; 4.x wrote `torch_dtype` and
# `dropout` too), plus the generic PreTrainedConfig keys that appear when set. Accepted without effect:
# * `dropout` (read by no CLIP layer), `attention_dropout`: training-time regularisers. This encoder is
#   deterministic, as transformers' in eval mode; nsync-jax never trains it (only new token rows).
# * `projection_dim`: used by CLIPTextModelWithProjection only (rejected through `architectures`).
# * `bos_token_id`, `pad_token_id`: the tokenizer's business; `eos_token_id` selects the pooled state.
# * initialisation scales, dtype and version stamps, transformers' output switches, classification-head labels.
_SUPPORTED = {
    "vocab_size": _positive_int,
    "hidden_size": _positive_int,
    "intermediate_size": _positive_int,
    "num_hidden_layers": _positive_int,
    "num_attention_heads": _positive_int,
    "max_position_embeddings": _positive_int,
    "hidden_act": lambda v: v in ACTIVATIONS,
    "layer_norm_eps": lambda v: _number(v) and v > 0,
    "eos_token_id": _int,
    "bos_token_id": _optional_int,
    "pad_token_id": _optional_int,
    "projection_dim": _optional_int,
    "dropout": lambda v: _number(v) and v >= 0,
    "attention_dropout": lambda v: _number(v) and v >= 0,
    "initializer_range": _number,
    "initializer_factor": _number,
    "architectures": lambda v: v is None or v == ["CLIPTextModel"],
    "model_type": lambda v: v == "clip_text_model",
    "dtype": _optional_str,
    "torch_dtype": _optional_str,
    "transformers_version": _optional_str,
    "output_attentions": _optional_bool,
    "output_hidden_states": _optional_bool,
    "return_dict": _optional_bool,
    "use_cache": _optional_bool,
    "tie_word_embeddings": _optional_bool,
    "chunk_size_feed_forward": _int,  # no CLIP layer chunks its feed-forward
    "is_encoder_decoder": lambda v: v is False,
    "id2label": _anything,
    "label2id": _anything,
    "problem_type": _anything,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' `CLIPTextConfig` that shape the model, with transformers' defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: Path | str = "config.json") -> "CLIPTextConfig":
        """Validates a transformers `config.json` dict; `UserError` naming `source` and the key otherwise."""
        weights.check_config(config, _SUPPORTED, source)
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in fields})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise UserError(f"{source}: config num_attention_heads={cfg.num_attention_heads} does not divide "
                            f"hidden_size={cfg.hidden_size}")
        return cfg


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, backend: str, opts: dict):
        self.heads = cfg.num_attention_heads
        self.backend = backend
        dim = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(dim, dim, **opts) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Causal self-attention over `(batch, tokens, hidden)`; scale head_dim**-0.5 (in the attention core)."""
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    causal=True, backend=self.backend)
        return self.out_proj(out.reshape(x.shape))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, opts: dict):
        self.activation = cfg.hidden_act
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **opts)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **opts)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


def _layer_norm(cfg: CLIPTextConfig, opts: dict) -> nnx.LayerNorm:
    # Flax computes the statistics in float32 whatever the compute dtype; the two-pass variance (torch's)
    # rather than E[x^2] - E[x]^2 keeps the large-magnitude channels of CLIP's residual stream exact.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **opts)


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, backend: str, opts: dict):
        self.layer_norm1 = _layer_norm(cfg, opts)
        self.self_attn = CLIPAttention(cfg, backend, opts)
        self.layer_norm2 = _layer_norm(cfg, opts)
        self.mlp = CLIPMLP(cfg, opts)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, backend: str, opts: dict):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, backend, opts) for _ in range(cfg.num_hidden_layers)])


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, opts: dict):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **opts)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **opts)


class CLIPTextModel(nnx.Module):
    """transformers' `CLIPTextModel`: token + position embeddings, causal pre-LN transformer, final LayerNorm."""

    def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32,
                 attention_backend: str = "auto", rngs: nnx.Rngs):
        opts = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, opts)
        self.encoder = CLIPEncoder(config, attention_backend, opts)
        self.final_layer_norm = _layer_norm(config, opts)

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 clip_skip: int = 0) -> jax.Array:
        """Hidden states `(batch, tokens, hidden)` after the final layer norm.

        Args:
          input_ids: `(batch, tokens)` token ids, or
          inputs_embeds: `(batch, tokens, hidden)` token embeddings (position embeddings are added here), so that
            a trainer can look up learned rows outside the frozen table.
          clip_skip: use the output of the layer `clip_skip` from the end (transformers' `hidden_states[-(k+1)]`),
            then the final layer norm, as diffusers' pipeline does. 0 is the last layer; SD 2.x's
            "penultimate layer" is 1.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        num_layers = len(self.encoder.layers)
        if not 0 <= clip_skip < num_layers:
            raise UserError(f"clip_skip={clip_skip} is out of range: the text encoder has {num_layers} layers "
                            f"(use 0 to {num_layers - 1})")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.token_embedding(input_ids)
        positions = self.embeddings.position_embedding.embedding[...]
        length = inputs_embeds.shape[1]
        if length > positions.shape[0]:
            raise ValueError(f"{length} tokens, but the text encoder has {positions.shape[0]} positions")
        x = inputs_embeds + positions[:length]
        for layer in self.encoder.layers[: num_layers - clip_skip]:
            x = layer(x)
        return self.final_layer_norm(x)


def pooled_output(hidden: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """transformers' `pooler_output`: each sequence's state at its first end-of-text token, `(batch, hidden)`.

    Configs older than transformers 4.24 (SD 1.x/2.x's among them) say `eos_token_id == 2`; for those
    transformers takes the largest id's position instead, which is wrong once tokens are added; kept for parity.
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
    """Loads a transformers `text_encoder/` folder (config.json + model.safetensors or pytorch_model.bin).

    `dtype` is the compute dtype; parameters are kept in `param_dtype` (default: `dtype`).
    """
    param_dtype = param_dtype or dtype
    return weights.load_model_folder(
        folder, parse_config=CLIPTextConfig.from_dict, weight_stems=weights.TRANSFORMERS_WEIGHTS,
        dtype=param_dtype, rename_keys=_strip_text_model_prefix,
        # A buffer (arange) that checkpoints from before transformers 4.31 carry; it holds no parameter.
        ignored_keys=lambda key: key == "embeddings.position_ids",
        build=lambda cfg, rngs: CLIPTextModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                              attention_backend=attention_backend, rngs=rngs))
