"""The trainable interface, its registry, and what token rows and module weights share."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsync_jax import distributed, tokens
from nsync_jax.errors import UserError
from nsync_jax.train.registry import Registry


class Trainable:
    """The interface; `ModuleWeights` and `Embeddings` below implement it."""

    name: str
    checkpoint_key: str  # the name of what is trained in a checkpoint's state
    norm_metric: str  # the metric that logs its norm
    trains_modules: bool  # False: the modules stay frozen, so groups of a step share one UNet pass
    export_formats: tuple[str, ...]  # `nsync-jax export --format` choices for a run that trained this
    load_dtype: Any = None  # `load_pipeline(param_dtype=)`: float32 master weights for what is trained

    def check_config(self, config, method) -> None:
        """Raises UserError for settings this trainable does not support with `method`."""

    def split(self, pipe, config, method, names) -> tuple[dict, dict, Any]:
        """`(graphdefs, frozen states, what is trained before the first step)` of the modules `names`."""
        raise NotImplementedError

    def module_states(self, name: str, trained, frozen) -> tuple:
        """The states `nnx.merge` takes for module `name` (`trained`: one copy, or None for the frozen model)."""
        return (frozen[name],)

    def for_model(self, sdxl: bool, config, method) -> Trainable:
        """The trainable for the loaded model (`sdxl`: a Stable Diffusion XL one); refuses what SDXL does not
        support yet."""
        if sdxl:
            raise UserError(f"config trainable={self.name!r} is not supported on Stable Diffusion XL yet: use "
                            "trainable='embeddings'")
        return self

    def configured(self, config) -> Trainable:
        """The trainable a run with `config` uses (a variant of this one where a setting asks for it)."""
        return self

    def embed(self, trained, table: jax.Array, ids: jax.Array) -> jax.Array:
        """The input embeddings of token ids `ids` with the text encoder's `table` (`trained`: one copy)."""
        return tokens.embed_tokens(table, jnp.zeros((0, table.shape[-1]), table.dtype), ids)

    def encoder_rows(self, trained, name: str) -> jax.Array | None:
        """The learned token rows of SDXL text encoder `name` in `trained` (one copy), or None: no rows."""
        return None

    def branch_params(self, trained, count: int):
        """One copy of what is trained per branch of a fused prediction (DreamArtist's negative and positive
        prompts), stacked on a leading axis: the same copy for each, unless a trainable keeps weights per branch."""
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (count, *x.shape)), trained)

    def shardings(self, mesh, tree):
        """Shardings of what is trained, or of its optimizer state (`tree`: either, or their shapes)."""
        return distributed.frozen_shardings(mesh, tree, False)

    def to_host(self, trained) -> Any:
        """What is trained as float32 numpy on every process (from global arrays, sharded or not)."""
        return jax.tree.map(lambda x: distributed.gather_to_host(x).astype(np.float32), trained)

    def show(self, pipe, trained) -> None:
        """Puts what is trained so far into the pipeline that draws the sample grids."""
        raise NotImplementedError

    def merge(self, modules: dict, trained, config, source: Path) -> None:
        """Puts a finished run's weights (host arrays) into a base model's modules `{name: module}`."""
        raise NotImplementedError

    def metadata(self, config) -> dict[str, Any]:
        """What the exported files record about this trainable."""
        return {}

    def write_outputs(self, workdir: Path, config, method, trained, metadata: dict) -> list[Path]:
        """The files a finished run leaves in its workdir for the PyTorch world; returns them."""
        return []

    def export(self, output: Path, fmt: str, config, method, trained, metadata: dict, source: Path) -> str:
        """Writes a checkpoint's `trained` (host arrays) as `fmt`; returns a line saying what it wrote."""
        raise NotImplementedError


REGISTRY: Registry[Trainable] = Registry("trainable")
register, get = REGISTRY.register, REGISTRY.find


def check_sdxl(config, method) -> None:
    """Refuses, naming the key, what no trainable supports on Stable Diffusion XL yet."""
    if not method.supports_sdxl:
        from nsync_jax.train import methods  # here: the methods import the step, which imports this module

        *others, last = (name for name, other in methods.REGISTRY.items() if other.supports_sdxl)
        supported = f"{', '.join(others)} or {last}"
        raise UserError(f"config method={method.name!r} is not supported on Stable Diffusion XL yet: use {supported}")


def split_frozen(pipe, names) -> tuple[dict, dict]:
    """`(graphdefs, states)` of the modules `names`, all frozen."""
    graphdefs, frozen = {}, {}
    for name in names:
        graphdefs[name], frozen[name] = nnx.split(pipe.modules()[name])
    return graphdefs, frozen

