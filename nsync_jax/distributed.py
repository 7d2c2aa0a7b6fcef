"""Device meshes and shardings.

Everything runs through `jax.jit` with explicit `NamedSharding`s over a mesh. The mesh is built with
`jax.sharding.Mesh` directly, which gives the classic automatic (GSPMD) axis type: XLA propagates shardings
through the UNet on its own, whereas `jax.make_mesh` now defaults to explicit axes, where every contraction
over a sharded dimension must name its output sharding.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def local_data_mesh() -> Mesh:
    """A one-axis mesh over this process's devices, for batch (data) parallelism."""
    return Mesh(np.array(jax.local_devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis, other axes whole."""
    return NamedSharding(mesh, P(DATA))


def pad_batch(array: np.ndarray, multiple: int) -> np.ndarray:
    """Pads the leading axis with copies of the last row up to a multiple of `multiple`."""
    missing = -len(array) % multiple
    if not missing:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])
