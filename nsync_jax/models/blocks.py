"""Building blocks shared by the UNet and the VAE: resnets, resampling, spatial transformers.

All images are NHWC `(batch, height, width, channels)`. Attribute names follow diffusers so that
`weights.load_module` maps `resnets.0.conv1.weight` to `resnets[0].conv1.kernel` without a table.
Group and layer norms compute their statistics in float32 (Flax's norm layers promote to at least
float32) and their variance in two passes (the one-pass E[x^2] - E[x]^2 loses digits on the large
activations of the VAE decoder), so bfloat16 runs stay stable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nsync_jax.models.attention import Attention


class Options:
    """Per-model settings every block needs: compute dtype, parameter dtype, attention backend, RNG."""

    def __init__(self, *, dtype=None, param_dtype=jnp.float32, attention_backend: str = "auto", rngs: nnx.Rngs):
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.attention_backend = attention_backend
        self.rngs = rngs

    def linear(self, fan_in: int, fan_out: int, *, bias: bool = True) -> nnx.Linear:
        return nnx.Linear(fan_in, fan_out, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                          rngs=self.rngs)

    def conv(self, fan_in: int, fan_out: int, kernel: int = 3, *, stride: int = 1, padding=None) -> nnx.Conv:
        pad = kernel // 2 if padding is None else padding
        return nnx.Conv(fan_in, fan_out, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                        dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

    def group_norm(self, channels: int, groups: int, eps: float) -> "GroupNorm":
        return GroupNorm(channels, groups, eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def layer_norm(self, features: int, eps: float = 1e-5) -> nnx.LayerNorm:
        return nnx.LayerNorm(features, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                             use_fast_variance=False, rngs=self.rngs)

    def attention(self, query_dim: int, **kwargs) -> Attention:
        return Attention(query_dim, backend=self.attention_backend, dtype=self.dtype,
                         param_dtype=self.param_dtype, rngs=self.rngs, **kwargs)


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC (parameters `scale`, `bias`, as `nnx.GroupNorm`).

    The statistics are reduced over space first, per channel, then over each group's channels: the same
    numbers as one reduction over `(H, W, C/G)`, but XLA's CPU backend runs this form 2-5x faster than
    reducing a reshaped `(B, HW, G, C/G)` tensor (the norms otherwise cost more than the convolutions).
    """

    def __init__(self, channels: int, groups: int, eps: float, *, dtype=None, param_dtype=jnp.float32):
        if channels % groups:
            raise ValueError(f"{groups} groups do not divide {channels} channels")
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def _group_mean(self, per_channel: jax.Array) -> jax.Array:
        """`(B, C)` per-channel means -> `(B, 1, 1, C)` means of each channel's group."""
        batch, channels = per_channel.shape
        grouped = per_channel.reshape(batch, self.groups, channels // self.groups).mean(axis=-1)
        return jnp.repeat(grouped, channels // self.groups, axis=1)[:, None, None, :]

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        centred = x32 - self._group_mean(x32.mean(axis=(1, 2)))
        variance = self._group_mean(jnp.square(centred).mean(axis=(1, 2)))
        y = centred * jax.lax.rsqrt(variance + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-Conv twice, with an optional timestep bias and a 1x1 shortcut when channels change."""

    def __init__(self, opts: Options, in_channels: int, out_channels: int, *, temb_channels: int | None,
                 groups: int, eps: float, output_scale_factor: float = 1.0):
        self.norm1 = opts.group_norm(in_channels, groups, eps)
        self.conv1 = opts.conv(in_channels, out_channels)
        self.time_emb_proj = opts.linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = opts.group_norm(out_channels, groups, eps)
        self.conv2 = opts.conv(out_channels, out_channels)
        self.conv_shortcut = opts.conv(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. `padding=0` is the VAE's variant, which pads only bottom and right by one."""

    def __init__(self, opts: Options, channels: int, *, padding: int = 1):
        self.padding = padding
        self.conv = opts.conv(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour upsampling to `size` (default 2x), then a 3x3 conv."""

    def __init__(self, opts: Options, channels: int):
        self.conv = opts.conv(channels, channels)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        batch, in_height, in_width, channels = x.shape
        height, width = size or (2 * in_height, 2 * in_width)
        if (height, width) == (2 * in_height, 2 * in_width):
            # A broadcast, not a gather: the gather's backward is a scatter-add, slow on XLA's CPU backend.
            doubled = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, in_height, 2, in_width, 2, channels))
            return self.conv(doubled.reshape(batch, height, width, channels))
        # torch's "nearest" picks source index floor(i * in / out) on each axis.
        rows = (jnp.arange(height) * x.shape[1]) // height
        cols = (jnp.arange(width) * x.shape[2]) // width
        return self.conv(x[:, rows][:, :, cols])


class GEGLU(nnx.Module):
    """Gated GELU (exact erf form): one projection to twice the width, half of it gates the other half."""

    def __init__(self, opts: Options, dim: int, inner: int):
        self.proj = opts.linear(dim, 2 * inner)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class Identity(nnx.Module):
    """diffusers' dropout slot in `ff.net` (rate 0 in every SD model); keeps the output layer at `ff.net.2`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class FeedForward(nnx.Module):
    def __init__(self, opts: Options, dim: int, mult: int = 4):
        self.net = nnx.List([GEGLU(opts, dim, dim * mult), Identity(), opts.linear(dim * mult, dim)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm and residuals."""

    def __init__(self, opts: Options, dim: int, *, heads: int, head_dim: int, context_dim: int, upcast: bool):
        self.norm1 = opts.layer_norm(dim)
        self.attn1 = opts.attention(dim, heads=heads, head_dim=head_dim, upcast=upcast)
        self.norm2 = opts.layer_norm(dim)
        self.attn2 = opts.attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = opts.layer_norm(dim)
        self.ff = FeedForward(opts, dim)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """diffusers' `Transformer2DModel` for SD: GroupNorm, projection in (1x1 conv or linear), blocks, out."""

    def __init__(self, opts: Options, channels: int, *, heads: int, head_dim: int, context_dim: int,
                 num_layers: int, groups: int, use_linear_projection: bool, upcast: bool):
        inner = heads * head_dim
        self.norm = opts.group_norm(channels, groups, 1e-6)
        project = opts.linear if use_linear_projection else (lambda i, o: opts.conv(i, o, 1))
        self.proj_in = project(channels, inner)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(opts, inner, heads=heads, head_dim=head_dim, context_dim=context_dim,
                                  upcast=upcast)
            for _ in range(num_layers)
        ])
        self.proj_out = project(inner, channels)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        # A 1x1 conv and a linear layer are the same map on NHWC; only the weight layout differs.
        h = self.proj_in(self.norm(x))
        h = h.reshape(batch, height * width, -1)
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h.reshape(batch, height, width, -1)) + x
