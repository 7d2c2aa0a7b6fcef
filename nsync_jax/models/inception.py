"""Inception-v3 feature extractor for FID and KID, in Flax NNX, in two variants.

* `"fid"`: the TensorFlow graph "inception-2015-12-05" as pytorch-fid rebuilds it (`fid_inception_v3`), the
  network of standard FID/KID (pytorch-fid, clean-fid, torch-fidelity, torchmetrics). Weights:
  pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`; 1008 classes.
* `"torchvision"`: `torchvision.models.inception_v3`, ImageNet weights `inception_v3_google-0cc3c7bd.pth`;
  1000 classes. The network of the NSYNC paper's FID/KID (gan-metrics-pytorch).

The two differ only in the pooling of the pool branch: "fid" averages over the valid pixels only
(`count_include_pad=False`) in Mixed_5b-5d, 6b-6e and 7b and takes a max in Mixed_7c, where torchvision
averages over 3x3 windows including the zero padding everywhere. Their weight files hold the same keys, so a
file is told apart only by its classifier's size.

Input: NHWC float32 images. The caller resizes (to 299x299 for standard numbers; any size >= 75 runs) and
normalises:
* "fid": `2 * x - 1` of images in [0, 1], as pytorch-fid (clean-fid feeds `(x - 128) / 128` of uint8, 0.4%
  different).
* "torchvision" with `transform_input=False` (the default): also `2 * x - 1`, as gan-metrics-pytorch feeds it
  (it calls the blocks directly, bypassing torchvision's input transform).
* "torchvision" with `transform_input=True`: ImageNet-normalised images `(x - mean) / std`, as torchvision's
  own `Inception_V3_Weights.IMAGENET1K_V1.transforms()` make them; `inception_v3(weights=...)` sets
  `transform_input=True`, which maps them back to `2 * x - 1` per channel (the formula below is torchvision's).

Module names are the PyTorch state-dict names (`Mixed_5b.branch1x1.conv`, `Mixed_5b.branch1x1.bn`, `fc`), so
`weights.load_module` loads a state dict by name; `AuxLogits.*` (torchvision's training-only head) and
`num_batches_tracked` are dropped. Batch norm is in inference mode (running statistics, epsilon 1e-3), and
convolutions and the classifier use `Precision.HIGHEST`, so GPUs and TPUs do not fall back to TF32/bf16.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsync_jax import weights
from nsync_jax.errors import UserError

VARIANTS = ("fid", "torchvision")
NUM_CLASSES = {"fid": 1008, "torchvision": 1000}
# The reference weight files, named in errors.
WEIGHT_FILES = {"fid": "pt_inception-2015-12-05-6726825d.pth", "torchvision": "inception_v3_google-0cc3c7bd.pth"}
FEATURES = 2048

# How the pool branch of each variant pools (InceptionA/C and Mixed_7b; Mixed_7c): "avg" counts the zero
# padding in a border window's mean (count_include_pad=True), "avg_valid" averages the valid pixels only.
_BRANCH_POOLS = {"fid": ("avg_valid", "max"), "torchvision": ("avg", "avg")}

# torchvision's `transform_input`: ImageNet (mean, std) normalisation undone to 2x - 1, per channel.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pool(x: jax.Array, kind: str, window: int = 3, stride: int = 1, pad: int = 0) -> jax.Array:
    """Max or mean over `window`x`window` windows of NHWC `x`, with `pad` pixels each side (floor mode)."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    if kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, padding)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, padding)
    if kind == "avg":
        return total / (window * window)
    if kind == "avg_valid":
        ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
        return total / jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, padding)
    raise ValueError(f"unknown pooling {kind!r}")


class BasicConv2d(nnx.Module):
    """Convolution without bias, batch norm (epsilon 1e-3, running statistics), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, *, stride: int = 1, padding=0, rngs: nnx.Rngs):
        pad_h, pad_w = _pair(padding)
        self.conv = nnx.Conv(c_in, c_out, _pair(kernel), strides=stride, padding=((pad_h, pad_h), (pad_w, pad_w)),
                             use_bias=False, precision=_HIGHEST, rngs=rngs)
        self.bn = nnx.BatchNorm(c_out, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """Mixed_5b-5d: 1x1, 5x5, double 3x3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int, pool: str, *, rngs: nnx.Rngs):
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool(x, self.pool, pad=1)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a: stride-2 reduction, 288 -> 768 channels."""

    def __init__(self, c_in: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _pool(x, "max", stride=2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-6e: factorised 7x7 branches (1x7 and 7x1 convolutions) of width c7 -> 768 channels."""

    def __init__(self, c_in: int, c7: int, pool: str, *, rngs: nnx.Rngs):
        row = dict(kernel=(1, 7), padding=(0, 3))
        col = dict(kernel=(7, 1), padding=(3, 0))
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row, rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row, rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        double = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            double = conv(double)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_pool(x, self.pool, pad=1)),
        ], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a: stride-2 reduction, 768 -> 1280 channels."""

    def __init__(self, c_in: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        tower = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = conv(tower)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), tower, _pool(x, "max", stride=2)],
                               axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/7c: 1x1, split 3x3 (1x3 | 3x1), double split 3x3 and pool branches -> 2048 channels."""

    def __init__(self, c_in: int, pool: str, *, rngs: nnx.Rngs):
        row = dict(kernel=(1, 3), padding=(0, 1))
        col = dict(kernel=(3, 1), padding=(1, 0))
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, **row, rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, **col, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row, rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col, rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(_pool(x, self.pool, pad=1)),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """Inception-v3 up to the 2048-d pool3 features (and the classifier), NHWC.

    Args:
      variant: "fid" (pytorch-fid's FID Inception) or "torchvision" (torchvision's ImageNet classifier).
      num_classes: the classifier's size; the variant's own (1008 or 1000) when None.
      transform_input: torchvision's input transform, from ImageNet-normalised input to `2x - 1` (see the
        module docstring for what each setting expects).
    """

    def __init__(self, variant: str = "fid", *, num_classes: int | None = None, transform_input: bool = False,
                 rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"Inception variant {variant!r} is not one of {VARIANTS}")
        self.variant = variant
        self.transform_input = transform_input
        pool, last_pool = _BRANCH_POOLS[variant]
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, pool, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, pool, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, pool, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, pool, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, pool, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, pool, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, pool, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, last_pool, rngs=rngs)
        self.fc = nnx.Linear(FEATURES, num_classes or NUM_CLASSES[variant], precision=_HIGHEST, rngs=rngs)

    def stages(self, images: jax.Array) -> dict[str, jax.Array]:
        """Every stage's output by name: the blocks (`Conv2d_1a_3x3` ... `Mixed_7c`, NHWC), the two stem max
        pools (`maxpool1`, `maxpool2`), `pool3` `(batch, 2048)` and `logits` `(batch, num_classes)`.

        Under jit, the stages a caller does not use are not computed.
        """
        x = images
        if self.transform_input:
            x = jnp.concatenate([x[..., c:c + 1] * (std / 0.5) + (mean - 0.5) / 0.5
                                 for c, (mean, std) in enumerate(zip(_IMAGENET_MEAN, _IMAGENET_STD))], axis=-1)
        out = {}
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = _pool(x, "max", stride=2) if name.startswith("maxpool") else getattr(self, name)(x)
            out[name] = x
        out["pool3"] = x.mean(axis=(1, 2))
        out["logits"] = self.fc(out["pool3"])  # torchvision's dropout is the identity in inference
        return out

    def __call__(self, images: jax.Array) -> jax.Array:
        """NHWC images, normalised as the variant expects -> pool3 features `(batch, 2048)`, what FID uses."""
        return self.stages(images)["pool3"]


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UserError(f"Inception variant {variant!r} is not one of {VARIANTS}")


def read_inception_state(path: Path) -> dict[str, np.ndarray]:
    """A torch-layout Inception state dict without the parts this module has no use for."""
    state = weights.read_state_dict(Path(path))
    return {k: v for k, v in state.items()
            if not k.startswith("AuxLogits.") and not k.endswith("num_batches_tracked")}


def inception_from_state(state: dict[str, np.ndarray], variant: str, source: Path, num_classes: int | None = None,
                         transform_input: bool = False) -> InceptionV3:
    """The module of `variant` filled with `state` (read from `source`); every key and shape is checked."""
    abstract = weights.abstract_module(
        lambda rngs: InceptionV3(variant, num_classes=num_classes, transform_input=transform_input, rngs=rngs))
    try:
        return weights.load_module(abstract, state, source=source)
    except UserError as e:
        raise UserError(f"{e} (expected the {variant!r} Inception-v3, as in {WEIGHT_FILES[variant]})") from None


def load_inception(path: Path, variant: str, *, num_classes: int | None = None,
                   transform_input: bool = False) -> InceptionV3:
    """Loads a torch-layout Inception-v3 state dict (`.safetensors`, or `.pth`/`.pt`/`.bin` with torch).

    All or nothing: a missing, unexpected or wrongly shaped weight raises `UserError` naming the file.
    """
    check_variant(variant)
    path = Path(path)
    return inception_from_state(read_inception_state(path), variant, path, num_classes, transform_input)
