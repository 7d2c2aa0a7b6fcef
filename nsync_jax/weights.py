"""Weights: diffusers/transformers model folders <-> Flax NNX modules.

One converter serves every model. The Flax modules are laid out with diffusers' and transformers' attribute
names, so a parameter's PyTorch key is its NNX path joined with dots (`down_blocks.0.resnets.1.conv1.weight`),
with Flax leaf names mapped back (`kernel`/`scale`/`embedding` -> `weight`). Layouts differ in two places,
handled here and nowhere else: conv kernels are OIHW in PyTorch and HWIO in Flax, linear kernels are
(out, in) in PyTorch and (in, out) in Flax.

A load is all or nothing: a missing, unexpected or wrongly shaped key raises `UserError` naming the file
and the key. `.safetensors` files are read with numpy (no torch); `.bin` files need the `torch` extra.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsync_jax.errors import UserError

# Weight file stems, in the order diffusers and transformers look for them.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")

# `mean`/`var` are `nnx.BatchNorm`'s running statistics (`BatchStat`s), torch's `running_mean`/`running_var`.
_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "mean": "running_mean",
                       "var": "running_var"}


def read_json(path: Path) -> dict[str, Any]:
    """Reads a JSON object, with a one-line error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def check_config(config: dict[str, Any], supported: dict[str, Callable[[Any], bool]], source: Path | str) -> None:
    """Fails on any config key this project does not implement, or a value it cannot honour.

    `supported` maps each known key to a predicate on its value. Keys starting with `_` are metadata.
    Ignoring an option silently is how diffusers' old Flax UNet drew different images from torch.
    """
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in supported:
            raise UserError(f"{source}: config key {key!r} is not supported by nsync-jax")
        if not supported[key](value):
            raise UserError(f"{source}: config {key}={value!r} is not supported by nsync-jax")


WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def with_variant(name: str, variant: str | None) -> str:
    """A weight file's name for a variant, as diffusers and transformers name it: `model.fp16.safetensors`,
    `model.safetensors.index.fp16.json` (the variant before the last extension)."""
    if not variant:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def weight_file_names(stems: Iterable[str], variant: str | None = None) -> list[str]:
    """The names a model folder's weights may have, preferred first: the `variant`'s files (if one is asked)
    before the plain ones, and for each `.safetensors` (single file, then a sharded index) before `.bin`."""
    stems = tuple(stems)
    return [with_variant(f"{stem}{suffix}", v) for v in dict.fromkeys((variant, None))
            for suffix in WEIGHT_SUFFIXES for stem in stems]


def find_weight_file(folder: Path, stems: Iterable[str], variant: str | None = None) -> Path:
    """The weight file of a model folder, the first of `weight_file_names(stems, variant)` that exists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found")
    candidates = [folder / name for name in weight_file_names(stems, variant)]
    for path in candidates:
        if path.is_file():
            return path
    names = ", ".join(p.name for p in candidates)
    raise UserError(f"{folder}: no weight file (looked for {names})")


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch-layout state dict as float32/int numpy arrays, from safetensors, .bin or an index."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        index = read_json(path)
        if not isinstance(index.get("weight_map"), dict):
            raise UserError(f"{path}: key 'weight_map' missing")
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_state_dict(path.parent / shard))
        return state
    if not path.is_file():
        raise UserError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read safetensors file ({e})") from None
        except TypeError:
            # numpy has no bfloat16 of its own: safetensors.numpy refuses such files.
            return _read_bf16_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _read_torch_file(path)
    raise UserError(f"{path}: unknown weight file type (expected .safetensors or .bin)")


def _read_bf16_safetensors(path: Path) -> dict[str, np.ndarray]:
    import ml_dtypes
    from safetensors import safe_open

    state = {}
    with safe_open(str(path), framework="flax") as f:
        for key in f.keys():
            state[key] = np.asarray(f.get_tensor(key)).astype(ml_dtypes.bfloat16)
    return state


def read_torch_pickle(path: Path) -> dict:
    """A dict saved with `torch.save`, read safely (`weights_only=True`); needs the `torch` extra."""
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path}: reading {path.suffix} weights needs PyTorch; install the extra (pip install 'nsync_jax[torch]') "
            "or convert the file to .safetensors"
        ) from None
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise UserError(f"{path}: cannot read PyTorch file ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a dict, found {type(raw).__name__}")
    return raw


def _read_torch_file(path: Path) -> dict[str, np.ndarray]:
    return {k: tensor_to_numpy(v) for k, v in read_torch_pickle(path).items() if hasattr(v, "detach")}


def tensor_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy; bfloat16 goes through float32 since numpy has no bfloat16 of its own."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def torch_key(path: tuple) -> str:
    """The PyTorch state-dict key of an NNX parameter path."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _FLAX_TO_TORCH_LEAF.get(leaf, leaf)])


def to_flax_layout(array: np.ndarray, path: tuple) -> np.ndarray:
    """Converts one PyTorch tensor to the layout of the Flax parameter at `path`."""
    if path[-1] == "kernel":
        if array.ndim == 4:
            return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if array.ndim == 2:
            return array.T  # (out, in) -> (in, out)
    return array


def to_torch_layout(array: np.ndarray, path: tuple) -> np.ndarray:
    """The inverse of `to_flax_layout`."""
    if path[-1] == "kernel":
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
        if array.ndim == 2:
            return array.T
    return array


class _ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` when a module is built only for its shapes (under `nnx.eval_shape`).

    flax 0.12.8 re-derives a tracer's provenance on every RNG counter update inside a trace, which makes
    building even a tiny UNet take seconds; a fixed key gives the same shapes in a fraction of that.
    """

    def __getattr__(self, stream: str) -> "_ShapeOnlyRngs":
        return self

    def __call__(self) -> jax.Array:
        return jax.random.key(0)


def abstract_module(build: Callable[[Any], nnx.Module]) -> nnx.Module:
    """The module `build(rngs)` returns, with shapes and dtypes but no allocated parameters."""
    return nnx.eval_shape(lambda: build(_ShapeOnlyRngs()))


def load_module(
    abstract_module: nnx.Module,
    state_dict: dict[str, np.ndarray],
    *,
    source: Path | str,
    ignored_keys: Callable[[str], bool] = lambda key: False,
    dtype=jnp.float32,
) -> nnx.Module:
    """Fills an abstract module (from `nnx.eval_shape`) with a PyTorch state dict, all or nothing.

    Args:
      abstract_module: the module from `abstract_module`, so nothing is allocated twice.
      state_dict: PyTorch keys to arrays in PyTorch layout.
      source: the weight file, named in errors.
      ignored_keys: keys present in files that carry no parameter (buffers such as `position_ids`).
      dtype: the dtype parameters are kept in.
    """
    graphdef, abstract_state = nnx.split(abstract_module)
    loaded = []
    used = set()
    for path, variable in nnx.to_flat_state(abstract_state):
        key = torch_key(path)
        if key not in state_dict:
            raise UserError(f"{source}: missing weight {key!r}")
        array = to_flax_layout(state_dict[key], path)
        if tuple(array.shape) != tuple(variable.shape):
            raise UserError(
                f"{source}: weight {key!r} has shape {tuple(state_dict[key].shape)}, but the config implies "
                f"{tuple(to_torch_layout(np.empty(variable.shape, np.uint8), path).shape)}"
            )
        used.add(key)
        loaded.append((path, variable.replace(jnp.asarray(array, dtype=dtype))))
    unexpected = sorted(k for k in state_dict if k not in used and not ignored_keys(k))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(f"{source}: unexpected weight {unexpected[0]!r}{more}: it does not match the config")
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def module_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's parameters as a PyTorch-layout state dict of float32 numpy arrays."""
    state = nnx.state(module, nnx.Param)
    return {
        torch_key(path): to_torch_layout(np.asarray(variable[...], np.float32), path)
        for path, variable in nnx.to_flat_state(state)
    }


def load_model_folder(
    folder: Path,
    *,
    parse_config: Callable[[dict, Path], Any],
    build: Callable[[Any, Any], nnx.Module],
    weight_stems: Iterable[str],
    dtype=jnp.float32,
    ignored_keys: Callable[[str], bool] = lambda key: False,
    rename_keys: Callable[[dict], dict] = lambda state: state,
    variant: str | None = None,
) -> nnx.Module:
    """Loads a diffusers/transformers model folder: `config.json`, then the weights, all or nothing.

    `parse_config(config_dict, path)` validates the config; `build(config, rngs)` constructs the module.
    `variant` (e.g. "fp16") prefers the variant's weight files (`model.fp16.safetensors`) where the folder has them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder not found")
    config_path = folder / "config.json"
    config = parse_config(read_json(config_path), config_path)
    abstract = abstract_module(lambda rngs: build(config, rngs))
    weight_file = find_weight_file(folder, weight_stems, variant)
    state = rename_keys(read_state_dict(weight_file))
    return load_module(abstract, state, source=weight_file, ignored_keys=ignored_keys,
                       dtype=dtype)
