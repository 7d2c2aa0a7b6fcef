"""Multi-host start-up, device meshes and shardings.

One program runs on every process (JAX's multi-controller model): `initialize` joins the processes into one
runtime, `make_mesh` lays every device of every host out on two axes, and each jitted function says how its
arguments and results are placed with `NamedSharding`s over that mesh:

- `data` and `fsdp` both split the global batch, so a (4, 2) mesh and an (8, 1) mesh run the same batch;
- `fsdp` can also split the frozen weights (`frozen_shardings`): XLA gathers each weight where it is used,
  which trades bandwidth for memory on models that do not fit one device;
- trainable token rows and their optimizer state are small and replicated everywhere.

The mesh uses `AxisType.Auto` on purpose: sharding propagation (GSPMD) then places every intermediate of
the UNet by itself. `jax.make_mesh`'s default, explicit axes, would require every contraction over a
sharded dimension in the model code to name its output sharding.
"""
from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nsync_jax.errors import UserError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch is split over both axes
MIN_SHARDED_SIZE = 2 ** 12  # smaller weights (biases, norms) stay replicated under fsdp
HEARTBEAT_TIMEOUT_S = 60  # a process that stops answering for this long makes the others fail


# ------------------------------------------------------------------------------------------------------------
# Processes.
# ------------------------------------------------------------------------------------------------------------

def _cluster_detected() -> bool:
    """True under a launcher JAX detects on its own and that started several processes (SLURM, TPU pods)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the multi-process runtime when this run has several processes; a single process does nothing.

    Explicit `coordinator` (host:port), `num_processes` and `process_id` go together; without them, SLURM
    and multi-host TPU environments are detected by `jax.distributed.initialize` itself. Must run before
    anything touches a device. If a process dies, the others fail after `HEARTBEAT_TIMEOUT_S` instead of
    waiting forever in a collective.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UserError("--coordinator, --num-processes and --process-id must be given together")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must be in [0, --num-processes={num_processes}), got {process_id}")
        if num_processes == 1:
            return
    elif not _cluster_detected():
        return
    # CPU devices need an explicit cross-process collectives backend; GPU and TPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


def is_main_process() -> bool:
    """Only this process writes logs, sample grids and exported files."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (a SIGTERM reaches the processes of a job at different steps,
    and all of them must stop after the same step to write one checkpoint together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


_barriers = itertools.count()  # every process passes the same barriers in the same order


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process gets here (the coordination service's barrier; no device collective)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the barrier JAX's and Orbax's own code use

    jax_distributed.global_state.client.wait_at_barrier(f"nsync_jax_{name}_{next(_barriers)}",
                                                        timeout_in_ms=timeout_s * 1000)


def compile_together(jitted, *args, name: str):
    """`jitted` compiled for `args` ahead of time, returned once every process has compiled it.

    A process that starts a collective while another is still compiling waits inside it, and gloo (CPU)
    gives up after 30 s; compile times differ between hosts (load, cache hits), so they meet here first.
    A single process has no one to wait for and keeps `jitted` itself, with its own compilation cache.
    """
    if jax.process_count() == 1:
        return jitted
    compiled = jitted.lower(*args).compile()
    barrier(name)
    return compiled


def use_cpu_devices(count) -> None:
    """A CPU backend split into `count` simulated devices, over which the toy world's steps split each batch:
    one XLA CPU device leaves 2 cores half idle on its small convolutions. It changes nothing unless the backend
    is the CPU, and must precede JAX's first use of a device: a process that already used one (a second `main`
    call, as in the tests) goes on with the devices it has."""
    if isinstance(count, int) and count > 1:  # the commands' own checks refuse other values
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:  # backends already initialised
            pass


# ------------------------------------------------------------------------------------------------------------
# The mesh.
# ------------------------------------------------------------------------------------------------------------

def make_mesh(data: int = -1, fsdp: int = 1, *, devices=None) -> Mesh:
    """A `(data, fsdp)` mesh over all devices of all processes; one size may be -1 (all remaining devices).

    A single-process run may ask for fewer devices than it has (say (1, 1) on an 8-GPU machine, to compare);
    it gets the first `data * fsdp`. A multi-process mesh must span every device of every process.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"mesh.data": data, "mesh.fsdp": fsdp}
    for key, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise UserError(f"config {key}={size!r} must be a positive integer or -1")
    if data == -1 and fsdp == -1:
        raise UserError("config mesh.data and mesh.fsdp cannot both be -1")
    if -1 in (data, fsdp):
        known = max(data, fsdp)
        if len(devices) % known:
            raise UserError(f"config mesh.data={data}, mesh.fsdp={fsdp}: {known} does not divide the "
                            f"{len(devices)} devices")
        data, fsdp = (len(devices) // known, fsdp) if data == -1 else (data, len(devices) // known)
    if data * fsdp > len(devices):
        raise UserError(f"config mesh.data={data} x mesh.fsdp={fsdp} needs {data * fsdp} devices, this run has "
                        f"{len(devices)}")
    if data * fsdp < len(devices) and jax.process_count() > 1:
        raise UserError(f"config mesh.data={data} x mesh.fsdp={fsdp} must span all {len(devices)} devices of the "
                        f"{jax.process_count()} processes")
    devices = devices[:data * fsdp]
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_size_of(mesh: Mesh) -> int:
    """How many ways the batch is split: every global batch must be a multiple of this."""
    return mesh.shape[DATA] * mesh.shape[FSDP]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """The batch axis split over both mesh axes, every other axis whole."""
    return NamedSharding(mesh, P(*([None] * batch_axis), BATCH_AXES))


def weight_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """fsdp placement of one frozen weight: its largest axis that `fsdp` divides; small weights replicated."""
    size = mesh.shape[FSDP]
    if size == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return replicated(mesh)
    candidates = [axis for axis in range(len(shape)) if shape[axis] % size == 0]
    if not candidates:
        return replicated(mesh)
    axis = max(candidates, key=lambda a: (shape[a], a))
    return NamedSharding(mesh, P(*([None] * axis), FSDP))


def frozen_shardings(mesh: Mesh, tree, shard_over_fsdp: bool):
    """Shardings for a pytree of frozen weights: replicated, or split over `fsdp` (see `weight_sharding`)."""
    if not shard_over_fsdp:
        return jax.tree.map(lambda _: replicated(mesh), tree)
    return jax.tree.map(lambda x: weight_sharding(mesh, tuple(x.shape)), tree)


# ------------------------------------------------------------------------------------------------------------
# Host data <-> global arrays.
# ------------------------------------------------------------------------------------------------------------

def put(array, sharding: NamedSharding, *, copy: bool = False) -> jax.Array:
    """A global array from a host array every process holds: each process copies only the rows of its own
    devices to them (like `jax.make_array_from_process_local_data`, for any sharding), nothing crosses hosts.

    A `jax.Array` already on this process's devices, with a sharding this process holds whole, moves from
    device to device, and the result may share its buffers (a detour through host memory would copy SD's
    2 GB of weights out of the GPU and back on every call). `copy=True` for arrays a jitted step will donate:
    donation must not delete the caller's arrays.
    """
    if isinstance(array, jax.Array) and sharding.is_fully_addressable and array.is_fully_addressable:
        return jax.device_put(array, sharding, may_alias=not copy)
    host_array = np.asarray(array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def put_tree(tree, shardings, *, copy: bool = False) -> Any:
    return jax.tree.map(lambda x, s: put(x, s, copy=copy), tree, shardings)


def to_host(array: jax.Array) -> np.ndarray:
    """A replicated global array as numpy (every process holds a full copy, so no communication)."""
    return np.asarray(array.addressable_data(0))


def gather_to_host(array: jax.Array) -> np.ndarray:
    """Any global array (replicated or sharded, over one or several processes) as a full numpy array."""
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def pad_batch(array: np.ndarray, multiple: int) -> np.ndarray:
    """Pads the leading axis with copies of the last row up to a multiple of `multiple`."""
    missing = -len(array) % multiple
    if not missing:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])

