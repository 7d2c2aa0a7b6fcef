"""diffusers' `AutoencoderKL` (the Stable Diffusion VAE) in Flax NNX.

Images are NHWC in [-1, 1]; latents are NHWC. `encode` returns the posterior's mean and log-variance (the
training code caches these once and samples a fresh latent each step); `decode` maps latents back to
images. Scaling by `config.scaling_factor` is the caller's job, as in diffusers.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax import weights
from nsync_jax.errors import UserError
from nsync_jax.models.attention import Attention
from nsync_jax.models.blocks import Downsample2D, Options, ResnetBlock2D, Upsample2D

_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)

_SUPPORTED = {
    "in_channels": _int,
    "out_channels": _int,
    "down_block_types": lambda v: all(t == "DownEncoderBlock2D" for t in v),
    "up_block_types": lambda v: all(t == "UpDecoderBlock2D" for t in v),
    "block_out_channels": lambda v: all(_int(c) for c in v),
    "layers_per_block": _int,
    "act_fn": lambda v: v == "silu",
    "latent_channels": _int,
    "norm_num_groups": _int,
    "sample_size": lambda v: v is None or _int(v) or isinstance(v, (list, tuple)),
    "scaling_factor": _number,
    "shift_factor": lambda v: v is None or v == 0,
    "latents_mean": lambda v: v is None,
    "latents_std": lambda v: v is None,
    "force_upcast": lambda v: isinstance(v, bool),
    "use_quant_conv": lambda v: isinstance(v, bool),
    "use_post_quant_conv": lambda v: isinstance(v, bool),
    "mid_block_add_attention": lambda v: isinstance(v, bool),
}

# Checkpoints converted before diffusers 0.14 name the mid-block attention like this.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Decode in float32 when sampling in float16/bfloat16 (the SDXL VAE overflows in half precision); diffusers'
    # default. SDXL's pipeline honours it, SD 1.x/2.x's does not.
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: Path | str = "config.json") -> "VAEConfig":
        weights.check_config(config, _SUPPORTED, source)
        n = len(config.get("block_out_channels", cls.block_out_channels))
        for key in ("down_block_types", "up_block_types"):
            if key in config and len(config[key]) != n:
                raise UserError(f"{source}: {key} and block_out_channels differ in length")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields}
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)


class VAEAttention(Attention):
    """The single-head self-attention of the VAE's mid block: GroupNorm in, residual out, over all pixels."""

    def __init__(self, opts: Options, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True, upcast=True,
                         backend=opts.attention_backend, dtype=opts.dtype, param_dtype=opts.param_dtype,
                         rngs=opts.rngs)
        self.group_norm = opts.group_norm(channels, groups, 1e-6)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, channels)
        return super().__call__(h).reshape(x.shape) + x


class MidBlock(nnx.Module):
    def __init__(self, opts: Options, channels: int, groups: int, attention: bool):
        resnet = lambda: ResnetBlock2D(opts, channels, channels, temb_channels=None, groups=groups, eps=1e-6)
        self.resnets = nnx.List([resnet(), resnet()])
        self.attentions = nnx.List([VAEAttention(opts, channels, groups)] if attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class CoderBlock(nnx.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional down- or upsampler."""

    def __init__(self, opts: Options, c_in: int, c_out: int, *, num_layers: int, groups: int,
                 downsample: bool = False, upsample: bool = False):
        self.resnets = nnx.List([
            ResnetBlock2D(opts, c_in if i == 0 else c_out, c_out, temb_channels=None, groups=groups, eps=1e-6)
            for i in range(num_layers)
        ])
        self.downsamplers = nnx.List([Downsample2D(opts, c_out, padding=0)] if downsample else [])
        self.upsamplers = nnx.List([Upsample2D(opts, c_out)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in [*self.resnets, *self.downsamplers, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, opts: Options, cfg: VAEConfig):
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = opts.conv(cfg.in_channels, channels[0])
        self.down_blocks = nnx.List([
            CoderBlock(opts, channels[max(i - 1, 0)], c, num_layers=cfg.layers_per_block, groups=groups,
                       downsample=i < len(channels) - 1)
            for i, c in enumerate(channels)
        ])
        self.mid_block = MidBlock(opts, channels[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = opts.group_norm(channels[-1], groups, 1e-6)
        self.conv_out = opts.conv(channels[-1], 2 * cfg.latent_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(self.mid_block(x))))


def _rematerialised(block: nnx.Module, x: jax.Array) -> jax.Array:
    """`block(x)`, its activations recomputed in the backward pass (weights passed in: they may be traced)."""
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


class Decoder(nnx.Module):
    def __init__(self, opts: Options, cfg: VAEConfig):
        channels, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = opts.conv(cfg.latent_channels, channels[0])
        self.mid_block = MidBlock(opts, channels[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nnx.List([
            CoderBlock(opts, channels[max(i - 1, 0)], c, num_layers=cfg.layers_per_block + 1, groups=groups,
                       upsample=i < len(channels) - 1)
            for i, c in enumerate(channels)
        ])
        self.conv_norm_out = opts.group_norm(channels[-1], groups, 1e-6)
        self.conv_out = opts.conv(channels[-1], cfg.out_channels)

    def __call__(self, z: jax.Array, *, remat: bool = False) -> jax.Array:
        # remat: the backward pass keeps only each block's input and recomputes the rest, so a loss through the
        # decoder at 512 px holds one block's activations at a time instead of all of them.
        run = _rematerialised if remat else (lambda block, x: block(x))
        x = run(self.mid_block, self.conv_in(z))
        for block in self.up_blocks:
            x = run(block, x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype=None, param_dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs):
        opts = Options(dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend, rngs=rngs)
        self.config = cfg
        self.encoder = Encoder(opts, cfg)
        self.decoder = Decoder(opts, cfg)
        moments = 2 * cfg.latent_channels
        self.quant_conv = opts.conv(moments, moments, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = (opts.conv(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.use_post_quant_conv else None)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images `(batch, H, W, 3)` in [-1, 1] -> posterior `(mean, logvar)`, each `(batch, H/8, W/8, 4)`."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array, *, remat: bool = False) -> jax.Array:
        """Unscaled latents `(batch, h, w, 4)` -> images `(batch, 8h, 8w, 3)`, nominally in [-1, 1].

        `remat=True` recomputes each decoder block in the backward pass (for losses through the decoder)."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents, remat=remat)


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """One latent draw from the diagonal Gaussian posterior (diffusers' `latent_dist.sample()`)."""
    noise = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise


def _rename_legacy_keys(state: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if "attentions" in parts and parts[-2] in _LEGACY_ATTENTION_NAMES:
            parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]
            if value.ndim == 4:  # stored as 1x1 convs by the original LDM code
                value = value[:, :, 0, 0]
        renamed[".".join(parts)] = value
    return renamed


def load_vae(folder: Path, *, dtype=jnp.float32, param_dtype=None, attention_backend: str = "auto",
             variant: str | None = None) -> AutoencoderKL:
    """Loads a diffusers `vae/` folder into a Flax `AutoencoderKL`."""
    param_dtype = param_dtype or dtype
    return weights.load_model_folder(
        folder, parse_config=VAEConfig.from_dict, weight_stems=weights.DIFFUSERS_WEIGHTS, dtype=param_dtype,
        rename_keys=_rename_legacy_keys, variant=variant,
        build=lambda cfg, rngs: AutoencoderKL(cfg, dtype=dtype, param_dtype=param_dtype,
                                              attention_backend=attention_backend, rngs=rngs))
