"""Orbax checkpoints of a training state, reading them back for export, and stopping cleanly on SIGTERM.

Used by the trainer and by the toy world's pretraining. A checkpoint is a pytree of arrays (`state`: what is
trained and its optimizer state) and a JSON dict (`meta`: the step, the config, a loss curve); batches and
noise are functions of (seed, step) in every loop here, so nothing else is needed to resume exactly.
"""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nsync_jax.errors import UserError


def manager(folder: Path, keep: int):
    """A checkpoint manager over `folder` (created), keeping the latest `keep` checkpoints."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(folder).absolute(), options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def save(manager, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step`: collective on every host;
    asynchronous after the arrays are copied off the devices, so the caller may donate them at once."""
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(manager, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checkpoint `step`'s state, restored onto the structure, shapes and shardings of `like` as they are now,
    and its metadata. A checkpoint of another structure (another trainable, an older layout) is a UserError
    naming the folder."""
    import orbax.checkpoint as ocp

    saved = manager.item_metadata(step)["state"]
    if set(saved) != set(like):
        raise UserError(f"{manager.directory}: checkpoint {step} holds {sorted(saved)} of another shape than "
                        f"this run trains ({sorted(like)}): use a new workdir, or the settings of the run that "
                        "wrote it")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def read(folder: Path, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's state (as numpy, on this host, whatever mesh or hosts wrote it) and its metadata; the
    latest checkpoint when `step` is None."""
    folder = Path(folder)
    reader = manager(folder, keep=1_000_000)
    steps = reader.all_steps()
    if not steps:
        raise UserError(f"{folder}: no checkpoints")
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"{folder}: no checkpoint for step {step} (have {', '.join(map(str, sorted(steps)))})")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        reader.item_metadata(step)["state"])
    state, meta = restore(reader, step, like)
    return jax.tree.map(np.asarray, state), meta


@contextlib.contextmanager
def stop_on_sigterm(enabled: bool = True):
    """Within it, SIGTERM appends True to the yielded list instead of killing the process, so that a training
    loop can checkpoint and stop at the end of its step; the previous handler comes back on exit."""
    stop_requested: list[bool] = []
    if not enabled:
        yield stop_requested
        return
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    try:
        yield stop_requested
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
