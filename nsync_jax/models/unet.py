"""diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x, 2.x and XL, in Flax NNX.

The module tree and its names follow diffusers, so a `unet/` folder loads by name through `weights.py`.
Inputs and outputs are NHWC latents `(batch, height/8, width/8, 4)`, not diffusers' NCHW.

`UNetConfig.from_dict` reads diffusers' `unet/config.json` and refuses every option this code does not
implement (diffusers' old Flax UNet ignored `norm_num_groups` and drew different images than torch).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax import weights
from nsync_jax.errors import UserError
from nsync_jax.models.attention import dot_product_attention
from nsync_jax.models.blocks import Downsample2D, Options, ResnetBlock2D, Transformer2DModel, Upsample2D

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_int_or_ints = lambda v: _int(v) or (isinstance(v, (list, tuple)) and all(_int(x) for x in v))
_none = lambda v: v is None
_false_or_falses = lambda v: v is False or (isinstance(v, (list, tuple)) and not any(v))

# Every key of diffusers' UNet2DConditionModel config, with the values this implementation honours.
_SUPPORTED = {
    "sample_size": lambda v: v is None or _int_or_ints(v),
    "in_channels": _int,
    "out_channels": _int,
    "center_input_sample": lambda v: isinstance(v, bool),
    "flip_sin_to_cos": lambda v: isinstance(v, bool),
    "freq_shift": lambda v: isinstance(v, (int, float)),
    "down_block_types": lambda v: all(t in _DOWN_TYPES for t in v),
    "mid_block_type": lambda v: v == "UNetMidBlock2DCrossAttn",
    "up_block_types": lambda v: all(t in _UP_TYPES for t in v),
    "only_cross_attention": _false_or_falses,
    "block_out_channels": _int_or_ints,
    "layers_per_block": _int_or_ints,
    "downsample_padding": lambda v: v == 1,
    "mid_block_scale_factor": lambda v: isinstance(v, (int, float)),
    "dropout": lambda v: isinstance(v, (int, float)),
    "act_fn": lambda v: v == "silu",
    "norm_num_groups": _int,
    "norm_eps": lambda v: isinstance(v, (int, float)),
    "cross_attention_dim": _int,
    "transformer_layers_per_block": _int_or_ints,
    "reverse_transformer_layers_per_block": _none,
    "encoder_hid_dim": _none,
    "encoder_hid_dim_type": _none,
    "attention_head_dim": _int_or_ints,
    "num_attention_heads": lambda v: v is None or _int_or_ints(v),
    "dual_cross_attention": lambda v: v is False,
    "use_linear_projection": lambda v: isinstance(v, bool),
    "class_embed_type": _none,
    "addition_embed_type": lambda v: v in (None, "text", "text_time"),
    "addition_time_embed_dim": lambda v: v is None or _int(v),
    "num_class_embeds": _none,
    "upcast_attention": lambda v: isinstance(v, bool) or v is None,
    "resnet_time_scale_shift": lambda v: v == "default",
    "resnet_skip_time_act": lambda v: v is False,
    "resnet_out_scale_factor": lambda v: v == 1.0,
    "time_embedding_type": lambda v: v == "positional",
    "time_embedding_dim": _none,
    "time_embedding_act_fn": _none,
    "timestep_post_act": _none,
    "time_cond_proj_dim": _none,
    "conv_in_kernel": lambda v: v in (1, 3, 5, 7),
    "conv_out_kernel": lambda v: v in (1, 3, 5, 7),
    "projection_class_embeddings_input_dim": lambda v: v is None or _int(v),
    "attention_type": lambda v: v == "default",
    "class_embeddings_concat": lambda v: v is False,
    "mid_block_only_cross_attention": lambda v: v in (None, False),
    "cross_attention_norm": _none,
    "addition_embed_type_num_heads": _int,
}


def _per_block(value, count: int, key: str, source) -> tuple[int, ...]:
    values = (value,) * count if _int(value) else tuple(value)
    if len(values) != count:
        raise UserError(f"{source}: config {key} has {len(values)} entries for {count} blocks")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    center_input_sample: bool = False
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int | None = 64
    # "text": the time embedding plus an attention-pooled summary of the text states (diffusers' TextTimeEmbedding).
    # "text_time" (SDXL): the time embedding plus an MLP of the pooled text embedding and the sinusoidal features
    # of the six micro-conditioning numbers (`time_ids`), `addition_time_embed_dim` each.
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: Path | str = "config.json") -> "UNetConfig":
        weights.check_config(config, _SUPPORTED, source)
        defaults = cls()
        get = lambda key: config.get(key, getattr(defaults, key, None))
        down, up = tuple(get("down_block_types")), tuple(get("up_block_types"))
        channels = tuple(get("block_out_channels"))
        if not (len(down) == len(up) == len(channels)):
            raise UserError(f"{source}: down_block_types, up_block_types and block_out_channels differ in length")
        n = len(channels)
        text_heads = get("addition_embed_type_num_heads")
        if config.get("addition_embed_type") == "text" and get("cross_attention_dim") % text_heads:
            raise UserError(f"{source}: config addition_embed_type_num_heads={text_heads} "
                            f"does not divide cross_attention_dim={get('cross_attention_dim')}")
        text_time_keys = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        text_time = config.get("addition_embed_type") == "text_time"
        for key in text_time_keys:
            if text_time and config.get(key) is None:
                raise UserError(f"{source}: config addition_embed_type='text_time' needs {key}")
            # Without "text_time" diffusers builds nothing from these keys: a config setting them means otherwise.
            if not text_time and config.get(key) is not None:
                raise UserError(f"{source}: config {key}={config[key]!r} is not supported without "
                                "addition_embed_type='text_time'")
        # diffusers' historical naming: in SD configs `attention_head_dim` holds the number of heads.
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        sample_size = get("sample_size")
        return cls(
            in_channels=get("in_channels"),
            out_channels=get("out_channels"),
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=_per_block(get("layers_per_block"), n, "layers_per_block", source),
            transformer_layers_per_block=_per_block(
                config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", source),
            num_attention_heads=_per_block(heads, n, "attention_head_dim", source),
            cross_attention_dim=get("cross_attention_dim"),
            norm_num_groups=get("norm_num_groups"),
            norm_eps=float(get("norm_eps")),
            flip_sin_to_cos=get("flip_sin_to_cos"),
            freq_shift=get("freq_shift"),
            center_input_sample=get("center_input_sample"),
            mid_block_scale_factor=float(get("mid_block_scale_factor")),
            use_linear_projection=get("use_linear_projection"),
            upcast_attention=bool(get("upcast_attention")),
            conv_in_kernel=get("conv_in_kernel"),
            conv_out_kernel=get("conv_out_kernel"),
            sample_size=sample_size if _int(sample_size) or sample_size is None else tuple(sample_size)[0],
            addition_embed_type=get("addition_embed_type"),
            addition_embed_type_num_heads=get("addition_embed_type_num_heads"),
            **{key: config.get(key) for key in text_time_keys},
        )


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal timestep features `(batch, dim)`, as diffusers' `get_timestep_embedding` (float32)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(embedding, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    def __init__(self, opts: Options, in_features: int, dim: int):
        self.linear_1 = opts.linear(in_features, dim)
        self.linear_2 = opts.linear(dim, dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))


class AttentionPooling(nnx.Module):
    """One vector per sequence `(batch, width)`: the mean token plus a learned offset attends over itself and
    every token (diffusers' AttentionPooling, from DeepFloyd IF)."""

    def __init__(self, opts: Options, width: int, heads: int):
        self.heads = heads
        self.backend = opts.attention_backend
        key = opts.rngs.params()
        self.positional_embedding = nnx.Param(
            (jax.random.normal(key, (1, width), jnp.float32) / width ** 0.5).astype(opts.param_dtype))
        self.q_proj, self.k_proj, self.v_proj = (opts.linear(width, width) for _ in range(3))

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, _, width = x.shape
        query = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
        x = jnp.concatenate([query, x], axis=1)
        heads = lambda y: y.reshape(batch, y.shape[1], self.heads, width // self.heads)
        pooled = dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                       backend=self.backend, upcast=True)  # diffusers' softmax is in float32
        return pooled.reshape(batch, width)


class TextTimeEmbedding(nnx.Module):
    """What `addition_embed_type="text"` adds to the time embedding: the text states, normed, pooled,
    projected to the time embedding's width and normed (diffusers' TextTimeEmbedding)."""

    def __init__(self, opts: Options, text_width: int, dim: int, heads: int):
        self.norm1 = opts.layer_norm(text_width)
        self.pool = AttentionPooling(opts, text_width, heads)
        self.proj = opts.linear(text_width, dim)
        self.norm2 = opts.layer_norm(dim)

    def __call__(self, context: jax.Array) -> jax.Array:
        return self.norm2(self.proj(self.pool(self.norm1(context))))


class UNetBlock(nnx.Module):
    """One down, mid or up block: resnets interleaved with optional spatial transformers, then resampling.

    The three diffusers block kinds differ only in where the skip connections enter and leave, so one
    class serves them all; `kind` is "down", "mid" or "up".
    """

    def __init__(self, opts: Options, cfg: UNetConfig, *, kind: str, resnet_in: list[int], out_channels: int,
                 temb_channels: int, heads: int | None, transformer_layers: int, resample: bool,
                 output_scale_factor: float = 1.0):
        self.kind = kind
        resnet = lambda c_in: ResnetBlock2D(opts, c_in, out_channels, temb_channels=temb_channels,
                                            groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                                            output_scale_factor=output_scale_factor)
        self.resnets = nnx.List([resnet(c) for c in resnet_in])
        num_attentions = len(resnet_in) - 1 if kind == "mid" else len(resnet_in)
        self.attentions = nnx.List([
            Transformer2DModel(opts, out_channels, heads=heads, head_dim=out_channels // heads,
                               context_dim=cfg.cross_attention_dim, num_layers=transformer_layers,
                               groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
                               upcast=cfg.upcast_attention)
            for _ in range(num_attentions if heads else 0)
        ])
        self.downsamplers = nnx.List([Downsample2D(opts, out_channels)] if resample and kind == "down" else [])
        self.upsamplers = nnx.List([Upsample2D(opts, out_channels)] if resample and kind == "up" else [])

    def __call__(self, h, temb, context, skips=(), upsample_size=None):
        """Returns `(h, skips)`: down blocks append their outputs to `skips`, up blocks consume them."""
        if self.kind == "mid":
            h = self.resnets[0](h, temb)
            for attention, resnet in zip(self.attentions, self.resnets[1:]):
                h = resnet(attention(h, context), temb)
            return h, skips
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            if self.kind == "up":
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[i](h, context)
            if self.kind == "down":
                skips.append(h)
        for downsampler in self.downsamplers:
            h = downsampler(h)
            skips.append(h)
        for upsampler in self.upsamplers:
            h = upsampler(h, upsample_size)
        return h, tuple(skips)


class UNet2DConditionModel(nnx.Module):
    def __init__(self, cfg: UNetConfig, *, dtype=None, param_dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        opts = Options(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend, rngs=rngs)
        self.config = cfg
        self.dtype = dtype
        channels = cfg.block_out_channels
        temb_channels = channels[0] * 4
        self.time_embedding = TimestepEmbedding(opts, channels[0], temb_channels)
        if cfg.addition_embed_type == "text":
            self.add_embedding = TextTimeEmbedding(opts, cfg.cross_attention_dim, temb_channels,
                                                   cfg.addition_embed_type_num_heads)
        elif cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(opts, cfg.projection_class_embeddings_input_dim, temb_channels)
        self.conv_in = opts.conv(cfg.in_channels, channels[0], cfg.conv_in_kernel)

        def block(kind, block_type, resnet_in, out, heads, layers, resample, **kw):
            cross = block_type.startswith("CrossAttn") or kind == "mid"
            return UNetBlock(opts, cfg, kind=kind, resnet_in=resnet_in, out_channels=out,
                             temb_channels=temb_channels, heads=heads if cross else None,
                             transformer_layers=layers, resample=resample, **kw)

        n = len(channels)
        down = []
        for i, block_type in enumerate(cfg.down_block_types):
            c_in = channels[max(i - 1, 0)]
            resnet_in = [c_in] + [channels[i]] * (cfg.layers_per_block[i] - 1)
            down.append(block("down", block_type, resnet_in, channels[i], cfg.num_attention_heads[i],
                              cfg.transformer_layers_per_block[i], resample=i < n - 1))
        self.down_blocks = nnx.List(down)
        self.mid_block = block("mid", "", [channels[-1]] * 2, channels[-1], cfg.num_attention_heads[-1],
                               cfg.transformer_layers_per_block[-1], resample=False,
                               output_scale_factor=cfg.mid_block_scale_factor)

        # Up block i mirrors down block n-1-i and takes one skip per down resnet plus its downsampler.
        rev = lambda values: tuple(reversed(values))
        r_channels, r_layers = rev(channels), rev(cfg.layers_per_block)
        r_heads, r_transformer = rev(cfg.num_attention_heads), rev(cfg.transformer_layers_per_block)
        skip_channels = [channels[0]]
        for i in range(n):
            skip_channels += [channels[i]] * cfg.layers_per_block[i] + ([channels[i]] if i < n - 1 else [])
        up = []
        prev = r_channels[0]
        for i, block_type in enumerate(cfg.up_block_types):
            num_layers = r_layers[i] + 1
            block_skips = [skip_channels.pop() for _ in range(num_layers)]
            resnet_in = [(prev if j == 0 else r_channels[i]) + s for j, s in enumerate(block_skips)]
            up.append(block("up", block_type, resnet_in, r_channels[i], r_heads[i], r_transformer[i],
                            resample=i < n - 1))
            prev = r_channels[i]
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = opts.group_norm(channels[0], cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = opts.conv(channels[0], cfg.out_channels, cfg.conv_out_kernel)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
                 added_cond: dict[str, jax.Array] | None = None) -> jax.Array:
        """Predicts noise (or velocity) for NHWC `sample` at `timesteps` `(batch,)` or scalar, given the
        text encoder states `context` `(batch, tokens, cross_attention_dim)`.

        `added_cond` is diffusers' `added_cond_kwargs`, for `addition_embed_type="text_time"` (SDXL) only:
        `text_embeds` `(batch, pooled width)` and `time_ids` `(batch, 6)` (original height and width, crop top
        and left, target height and width).
        """
        cfg = self.config
        if (added_cond is not None) != (cfg.addition_embed_type == "text_time"):
            raise ValueError("added_cond (text_embeds, time_ids) is given exactly when addition_embed_type is "
                             f"'text_time'; this UNet's is {cfg.addition_embed_type!r}")
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        t_features = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                        freq_shift=cfg.freq_shift)
        temb = self.time_embedding(t_features.astype(self.dtype or sample.dtype))
        if cfg.addition_embed_type == "text":
            temb = temb + self.add_embedding(context.astype(temb.dtype))
        elif cfg.addition_embed_type == "text_time":
            temb = temb + self.add_embedding(self._text_time_features(**added_cond).astype(temb.dtype))

        h = self.conv_in(sample)
        skips = (h,)
        for block in self.down_blocks:
            h, skips = block(h, temb, context, skips)
        h, _ = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            skips_in, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            # Odd latent sizes: upsample to the size of the next skip instead of exactly 2x.
            size = skips[-1].shape[1:3] if skips else None
            h, _ = block(h, temb, context, skips_in, upsample_size=size)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))

    def _text_time_features(self, text_embeds: jax.Array, time_ids: jax.Array) -> jax.Array:
        """concat(text_embeds, sinusoidal features of each time id): `add_embedding`'s input (diffusers'
        `add_time_proj`, which shares the time projection's flip and shift)."""
        batch = text_embeds.shape[0]
        time_features = timestep_embedding(time_ids.reshape(-1), self.config.addition_time_embed_dim,
                                           flip_sin_to_cos=self.config.flip_sin_to_cos,
                                           freq_shift=self.config.freq_shift)
        return jnp.concatenate([text_embeds.astype(jnp.float32), time_features.reshape(batch, -1)], axis=-1)


def load_unet(folder: Path, *, dtype=jnp.float32, param_dtype=None, attention_backend: str = "auto",
              variant: str | None = None) -> UNet2DConditionModel:
    """Loads a diffusers `unet/` folder (config.json + safetensors or .bin) into a Flax UNet.

    `dtype` is the compute dtype; parameters are kept in `param_dtype` (default: `dtype`).
    """
    param_dtype = param_dtype or dtype
    return weights.load_model_folder(
        folder, parse_config=UNetConfig.from_dict, weight_stems=weights.DIFFUSERS_WEIGHTS, dtype=param_dtype,
        variant=variant,
        build=lambda cfg, rngs: UNet2DConditionModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                                     attention_backend=attention_backend, rngs=rngs))
