"""Deterministic pseudo-random Inception-v3 weights and inputs, in numpy only.

Shared by `tests/test_inception.py` (CI, no torch) and `tests/fixtures/make_inception_fixtures.py` (run once
in a throwaway venv with torch and torchvision), so both sides build bit-identical weights and images from
names, shapes and seeds alone: the fixtures then only store what the PyTorch references computed.

Each parameter is drawn from its own generator seeded by (seed, crc32 of its name), so the draw does not depend
on the order of the state dict. Convolutions are He-normal and the batch norms are near, but never exactly,
the identity (scale ~1, bias ~0, running mean ~0, running variance spread over [0.5, 1.5]), so activations
stay of order one through all 94 layers while a misplaced statistic or epsilon still shows.
"""
from __future__ import annotations

import zlib

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# The inputs of each fixture case. `input`: "2x-1" feeds 2u - 1 of images u in [0, 1] (pytorch-fid,
# gan-metrics-pytorch); "imagenet" feeds (u - mean) / std to a torchvision model with transform_input=True.
# The odd sizes (>= 75, the smallest that reaches Mixed_7c) put the padded borders under test.
CASES = {
    "fid": {
        "299": dict(seed=1, batch=2, height=299, width=299, input="2x-1", transform_input=False),
        "odd": dict(seed=2, batch=1, height=123, width=96, input="2x-1", transform_input=False),
    },
    "torchvision": {
        "299": dict(seed=3, batch=2, height=299, width=299, input="2x-1", transform_input=False),
        "odd_transform_input": dict(seed=4, batch=1, height=123, width=96, input="imagenet", transform_input=True),
    },
}
WEIGHT_SEED = 0
# Stages whose per-image channel means the fixtures keep, to localise a mismatch.
STAGES = ("maxpool2", "Mixed_5b", "Mixed_6e")


def random_parameter(name: str, shape, seed: int = WEIGHT_SEED) -> np.ndarray:
    """The float32 value of the torch-layout parameter `name` of shape `shape`."""
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("conv.weight"):  # (out, in, kh, kw)
        value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif name.endswith("bn.weight"):
        value = rng.uniform(0.8, 1.2, shape)
    elif name.endswith("bn.bias") or leaf == "running_mean":
        value = rng.normal(0.0, 0.1, shape)
    elif leaf == "running_var":
        value = rng.uniform(0.5, 1.5, shape)
    elif name == "fc.weight":
        value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
    elif name == "fc.bias":
        value = rng.normal(0.0, 0.01, shape)
    else:
        raise KeyError(f"no rule for Inception parameter {name!r}")
    return value.astype(np.float32)


def random_state_dict(shapes: dict[str, tuple], seed: int = WEIGHT_SEED) -> dict[str, np.ndarray]:
    """`random_parameter` for every (name, shape) of a torch-layout state dict."""
    return {name: random_parameter(name, shape, seed) for name, shape in shapes.items()}


def images(case: dict) -> np.ndarray:
    """The case's network input, NHWC float32, normalised as `case["input"]` says."""
    rng = np.random.default_rng(case["seed"])
    u = rng.random((case["batch"], case["height"], case["width"], 3), dtype=np.float32)
    if case["input"] == "2x-1":
        return 2 * u - 1
    if case["input"] == "imagenet":
        return (u - IMAGENET_MEAN) / IMAGENET_STD
    raise ValueError(f"unknown input normalisation {case['input']!r}")
