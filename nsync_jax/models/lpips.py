"""LPIPS (Zhang et al., the `lpips` package, v0.1) in Flax NNX: AlexNet or VGG-16 features, learned 1x1 heads.

`LPIPS(net)(a, b)` is `lpips.LPIPS(net=net)(a, b)`, images `(batch, height, width, 3)` in [-1, 1]:

1. lpips' `ScalingLayer`: `(x - SHIFT) / SCALE` per channel;
2. torchvision's `alexnet().features` or `vgg16().features`, tapped after the ReLUs that close each of lpips'
   five slices (AlexNet relu1-relu5; VGG relu1_2, relu2_2, relu3_3, relu4_3, relu5_3);
3. per tap: each pixel's features divided by their norm + 1e-10, squared difference of the two images, a 1x1
   convolution to one channel without bias (lpips' `lin{k}`, its dropout the identity in inference), the mean
   over pixels;
4. the sum over taps, `(batch,)`.

Weights: one `.safetensors` file written by `nsync_jax.convert.convert_lpips` from torchvision's backbone
(`features.{i}.weight`/`bias`, PyTorch layouts and names) and lpips' heads (`lin{k}.model.1.weight`, stored as
`heads.{k}.weight`). Convolutions run at `Precision.HIGHEST` (no TF32/bf16 passes on GPUs and TPUs).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsync_jax import weights
from nsync_jax.errors import UserError

NETS = ("alex", "vgg")
# lpips' ScalingLayer constants, for images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# torchvision's `features`, as (index, in, out, kernel, stride, padding) for each convolution (a ReLU follows
# each), "pool" for its max pools and "tap" where lpips' slices end.
_ALEX = [(0, 3, 64, 11, 4, 2), "tap", "pool", (3, 64, 192, 5, 1, 2), "tap", "pool", (6, 192, 384, 3, 1, 1), "tap",
         (8, 384, 256, 3, 1, 1), "tap", (10, 256, 256, 3, 1, 1), "tap"]
_VGG_WIDTHS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def _vgg_layers() -> list:
    layers, index, channels = [], 0, 3
    for block, widths in enumerate(_VGG_WIDTHS):
        if block:
            layers.append("pool")
            index += 1
        for width in widths:
            layers.append((index, channels, width, 3, 1, 1))
            index, channels = index + 2, width
        layers.append("tap")
    return layers


LAYERS = {"alex": _ALEX, "vgg": _vgg_layers()}
# The release files each network is converted from, named in errors.
WEIGHT_FILES = {"alex": "torchvision's alexnet-owt-7be5be79.pth and lpips' weights/v0.1/alex.pth",
                "vgg": "torchvision's vgg16-397923af.pth and lpips' weights/v0.1/vgg.pth"}
# torchvision's pools: AlexNet's MaxPool2d(3, 2), VGG's MaxPool2d(2, 2); neither pads.
_POOL = {"alex": (3, 2), "vgg": (2, 2)}


def check_net(net: str) -> None:
    if net not in NETS:
        raise UserError(f"LPIPS network {net!r} is not one of {NETS}")


def _unit(x: jax.Array) -> jax.Array:
    """lpips' `normalize_tensor`: each pixel's channel vector over (its norm + 1e-10)."""
    return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + 1e-10)


class LPIPS(nnx.Module):
    def __init__(self, net: str, *, rngs: nnx.Rngs):
        check_net(net)
        self.net = net
        convs = {}
        taps = []
        for layer in LAYERS[net]:
            if isinstance(layer, tuple):
                index, channels_in, channels_out, kernel, stride, padding = layer
                convs[str(index)] = nnx.Conv(channels_in, channels_out, (kernel, kernel), strides=(stride, stride),
                                             padding=[(padding, padding)] * 2, param_dtype=jnp.float32, rngs=rngs)
                width = channels_out
            elif layer == "tap":
                taps.append(width)
        self.features = nnx.Dict(convs)
        self.heads = nnx.List([nnx.Conv(width, 1, (1, 1), use_bias=False, param_dtype=jnp.float32, rngs=rngs)
                               for width in taps])

    def taps(self, images: jax.Array) -> list[jax.Array]:
        """The backbone's five tapped activations of scaled images."""
        x = (images - jnp.asarray(SHIFT, images.dtype)) / jnp.asarray(SCALE, images.dtype)
        window, stride = _POOL[self.net]
        out = []
        for layer in LAYERS[self.net]:
            if isinstance(layer, tuple):
                x = jax.nn.relu(self.features[str(layer[0])](x))
            elif layer == "pool":
                x = nnx.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")
            else:
                out.append(x)
        return out

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """LPIPS distances `(batch,)` between images `a` and `b`, `(batch, height, width, 3)` in [-1, 1]."""
        total = jnp.zeros(a.shape[0], jnp.float32)
        with jax.default_matmul_precision("highest"):
            for head, both in zip(self.heads, self.taps(jnp.concatenate([a, b]))):
                x, y = jnp.split(both, 2)
                total = total + head((_unit(x) - _unit(y)) ** 2).mean(axis=(1, 2, 3))
        return total


def lpips_from_state(state: dict[str, np.ndarray], net: str, source: Path | str) -> LPIPS:
    """The `net` LPIPS filled with `state` (this module's names); every key and shape is checked."""
    check_net(net)
    try:
        return weights.load_module(weights.abstract_module(lambda rngs: LPIPS(net, rngs=rngs)), state, source=source)
    except UserError as e:
        raise UserError(f"{e} (expected LPIPS-{net}: {WEIGHT_FILES[net]})") from None


def load_lpips(path: Path, net: str) -> LPIPS:
    """Loads a file written by `convert.convert_lpips`, all or nothing."""
    path = Path(path)
    return lpips_from_state(weights.read_state_dict(path), net, path)
