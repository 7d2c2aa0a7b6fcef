"""transformers' `CLIPTextModel` (the Stable Diffusion text encoder) and `CLIPTextModelWithProjection` (SDXL's
second one) in Flax NNX, and the transformer encoder that CLIP's text and image towers share.

The attribute tree is transformers', so `encoder.layers.3.mlp.fc1` loads into `encoder.layers[3].mlp.fc1`.
Checkpoints saved before transformers 5 (every released SD folder) prefix their keys with `text_model.`;
both spellings load. SD 1.x uses OpenAI's ViT-L/14 text tower (quick GELU); SD 2.x uses OpenCLIP-H's
(exact GELU) and conditions on the penultimate layer, which is `clip_skip=1` here, as in diffusers' pipeline.
SDXL conditions on both encoders' penultimate layers without the final layer norm (`hidden_states`).

`CLIPEncoder` (pre-LN layers of attention and MLP) is the one encoder of both towers: causal here, not causal
in `nsync_jax.models.clip_vision`. It reads only the fields the two configs share (`EncoderConfig`).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, ClassVar, Protocol

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
positive_int = lambda v: _int(v) and v > 0
_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
_optional_int = lambda v: v is None or _int(v)
_optional_bool = lambda v: v is None or isinstance(v, bool)
_optional_str = lambda v: v is None or isinstance(v, str)
_anything = lambda v: True

# The keys of a text or vision CLIP config that shape the shared encoder, and the generic PreTrainedConfig keys
# transformers writes (5.x writes few; 4.x wrote them all, and they fill the sub-configs of every released
# CLIPModel folder). Accepted without effect:
# * `dropout` (read by no CLIP layer), `attention_dropout`: training-time regularisers. This encoder is
#   deterministic, as transformers' in eval mode; nsync-jax never trains it (only new token rows).
# * `projection_dim`: read by the models with a projection, not by the encoder.
# * `bos_token_id`, `pad_token_id`, `eos_token_id`: the tokenizer's business (the text config gives
#   `eos_token_id` a meaning of its own: it selects the pooled state).
# * initialisation scales, dtype and version stamps, transformers' output switches, classification-head labels,
#   and 4.x's generation settings (beam search, sampling, length limits), which no encoder reads.
# Options that would change the computation are accepted only at their no-op value (`pruned_heads`,
# `is_decoder`, `add_cross_attention`, ...).
ENCODER_CONFIG_KEYS = {
    "hidden_size": positive_int,
    "intermediate_size": positive_int,
    "num_hidden_layers": positive_int,
    "num_attention_heads": positive_int,
    "hidden_act": lambda v: v in ACTIVATIONS,
    "layer_norm_eps": lambda v: _number(v) and v > 0,
    "projection_dim": _optional_int,
    "dropout": lambda v: _number(v) and v >= 0,
    "attention_dropout": lambda v: _number(v) and v >= 0,
    "initializer_range": _number,
    "initializer_factor": _number,
    "bos_token_id": _optional_int,
    "pad_token_id": _optional_int,
    "eos_token_id": _optional_int,
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
    "is_decoder": lambda v: v is False,
    "add_cross_attention": lambda v: v is False,
    "cross_attention_hidden_size": lambda v: v is None,
    "pruned_heads": lambda v: v == {},
    "tie_encoder_decoder": _optional_bool,
    "torchscript": _optional_bool,
    "use_bfloat16": _optional_bool,
    "tf_legacy_loss": _optional_bool,
    "id2label": _anything,
    "label2id": _anything,
    "problem_type": _anything,
    "finetuning_task": _anything,
    "tokenizer_class": _anything,
    "prefix": _anything,
    "task_specific_params": _anything,
    **dict.fromkeys(
        ("max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
         "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
         "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
         "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
         "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
         "decoder_start_token_id", "sep_token_id"),
        _anything),
}

# Every key transformers writes for a CLIPTextConfig. `projection_dim` is used by CLIPTextModelWithProjection
# only (`CLIPTextWithProjectionConfig`) and by CLIPModel, which reads its own top-level value; `architectures`
# says which of the two text models a folder holds.
_SUPPORTED = {
    **ENCODER_CONFIG_KEYS,
    "vocab_size": positive_int,
    "max_position_embeddings": positive_int,
    "eos_token_id": _int,
    "model_type": lambda v: v == "clip_text_model",
}


class EncoderConfig(Protocol):
    """The config fields `CLIPEncoder` reads; `CLIPTextConfig` and `CLIPVisionConfig` both have them."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float


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

    ARCHITECTURE: ClassVar[str] = "CLIPTextModel"

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: Path | str = "config.json") -> "CLIPTextConfig":
        """Validates a transformers `config.json` dict; `UserError` naming `source` and the key otherwise."""
        weights.check_config(config, {**_SUPPORTED, "architectures": lambda v: v is None or v == [cls.ARCHITECTURE]},
                             source)
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in fields})
        check_heads(cfg, source)
        return cfg


@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    projection_dim: int = 512

    ARCHITECTURE: ClassVar[str] = "CLIPTextModelWithProjection"


def check_heads(cfg: EncoderConfig, source: Path | str) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(f"{source}: config num_attention_heads={cfg.num_attention_heads} does not divide "
                        f"hidden_size={cfg.hidden_size}")


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, causal: bool, backend: str, opts: dict):
        self.heads = cfg.num_attention_heads
        self.causal = causal
        self.backend = backend
        dim = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(dim, dim, **opts) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Self-attention over `(batch, tokens, hidden)`; scale head_dim**-0.5 (in the attention core)."""
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    causal=self.causal, backend=self.backend)
        return self.out_proj(out.reshape(x.shape))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: EncoderConfig, opts: dict):
        self.activation = cfg.hidden_act
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **opts)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **opts)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


def layer_norm(cfg: EncoderConfig, opts: dict) -> nnx.LayerNorm:
    # Flax computes the statistics in float32 whatever the compute dtype; the two-pass variance (torch's)
    # rather than E[x^2] - E[x]^2 keeps the large-magnitude channels of CLIP's residual stream exact.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **opts)


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, causal: bool, backend: str, opts: dict):
        self.layer_norm1 = layer_norm(cfg, opts)
        self.self_attn = CLIPAttention(cfg, causal=causal, backend=backend, opts=opts)
        self.layer_norm2 = layer_norm(cfg, opts)
        self.mlp = CLIPMLP(cfg, opts)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """transformers' `CLIPEncoder`: pre-LN layers; `causal` masks later tokens (the text tower)."""

    def __init__(self, cfg: EncoderConfig, *, causal: bool, backend: str, opts: dict):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, causal=causal, backend=backend, opts=opts)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, num_layers: int | None = None) -> jax.Array:
        """`(batch, tokens, hidden)` through the first `num_layers` layers (default: all)."""
        for layer in self.layers[:num_layers]:
            x = layer(x)
        return x


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
        self.encoder = CLIPEncoder(config, causal=True, backend=attention_backend, opts=opts)
        self.final_layer_norm = layer_norm(config, opts)

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
        num_layers = len(self.encoder.layers)
        if not 0 <= clip_skip < num_layers:
            raise UserError(f"clip_skip={clip_skip} is out of range: the text encoder has {num_layers} layers "
                            f"(use 0 to {num_layers - 1})")
        x = self.encoder(self._embed(input_ids, inputs_embeds), num_layers=num_layers - clip_skip)
        return self.final_layer_norm(x)

    def hidden_states(self, input_ids: jax.Array | None = None, *,
                      inputs_embeds: jax.Array | None = None) -> list[jax.Array]:
        """transformers' `hidden_states`: the embeddings, then each layer's output, `(batch, tokens, hidden)`
        each, without the final layer norm (SDXL conditions on `hidden_states[-2]` as it is)."""
        states = [self._embed(input_ids, inputs_embeds)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states

    def _embed(self, input_ids: jax.Array | None, inputs_embeds: jax.Array | None) -> jax.Array:
        """Token plus position embeddings, from ids or from token embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.token_embedding(input_ids)
        positions = self.embeddings.position_embedding.embedding[...]
        length = inputs_embeds.shape[1]
        if length > positions.shape[0]:
            raise ValueError(f"{length} tokens, but the text encoder has {positions.shape[0]} positions")
        return inputs_embeds + positions[:length]


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' `CLIPTextModelWithProjection`: `CLIPTextModel` and a bias-free `text_projection` of the
    pooled output (SDXL's OpenCLIP bigG encoder, whose projected pooled output conditions the UNet)."""

    def __init__(self, config: CLIPTextWithProjectionConfig, *, dtype=None, param_dtype=jnp.float32,
                 attention_backend: str = "auto", rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend,
                         rngs=rngs)
        self.text_projection = nnx.Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)

    def text_embeds(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
        """transformers' `text_embeds` `(batch, projection_dim)` from the output of `__call__` (after the final
        layer norm) and the ids that gave it."""
        return self.text_projection(pooled_output(last_hidden_state, input_ids, self.config.eos_token_id))


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


def load_text_encoder(folder: Path, *, dtype=jnp.float32, param_dtype=None, attention_backend: str = "auto",
                      variant: str | None = None, with_projection: bool = False) -> CLIPTextModel:
    """Loads a transformers `text_encoder/` folder (config.json + model.safetensors or pytorch_model.bin).

    `with_projection` loads a `CLIPTextModelWithProjection` folder (SDXL's `text_encoder_2/`) instead.
    `dtype` is the compute dtype; parameters are kept in `param_dtype` (default: `dtype`).
    """
    param_dtype = param_dtype or dtype
    config_class, model_class = ((CLIPTextWithProjectionConfig, CLIPTextModelWithProjection) if with_projection
                                 else (CLIPTextConfig, CLIPTextModel))
    return weights.load_model_folder(
        folder, parse_config=config_class.from_dict, weight_stems=weights.TRANSFORMERS_WEIGHTS,
        dtype=param_dtype, rename_keys=_strip_text_model_prefix, variant=variant,
        # A buffer (arange) that checkpoints from before transformers 4.31 carry; it holds no parameter.
        ignored_keys=lambda key: key == "embeddings.position_ids",
        build=lambda cfg, rngs: model_class(cfg, dtype=dtype, param_dtype=param_dtype,
                                            attention_backend=attention_backend, rngs=rngs))
