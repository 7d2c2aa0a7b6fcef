"""Orbax checkpoints of a training state, reading them back for export, stopping cleanly on SIGTERM, and one
run per folder (`workdir_lock`).

Used by the trainer and by the toy world's pretraining. A checkpoint is a pytree of arrays (`state`: what is
trained and its optimizer state) and a JSON dict (`meta`: the step, the config, a loss curve); batches and
noise are functions of (seed, step) in every loop here, so nothing else is needed to resume exactly.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nsync_jax import distributed
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
    and its metadata. A checkpoint of another structure or shape (another trainable, method or number of
    vectors) is a one-line UserError naming the folder."""
    import orbax.checkpoint as ocp

    saved = manager.item_metadata(step)["state"]
    if set(saved) != set(like):
        raise UserError(f"{manager.directory}: checkpoint {step} holds {sorted(saved)} of another shape than "
                        f"this run trains ({sorted(like)}): use a new workdir, or the settings of the run that "
                        "wrote it")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
    except ValueError as error:  # Orbax's words for a tree or shape that differs from the one saved
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"{manager.directory}: checkpoint {step} does not fit this run ({reason}): use a new "
                        "workdir, or the settings of the run that wrote it") from None
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


@contextlib.contextmanager
def workdir_lock(folder: Path, what: str):
    """Holds `folder/.lock` (the folder is created) for the duration of the block: one run per folder.

    Two runs writing one workdir would both checkpoint and both append to its logs (measured: two `nsync-jax
    train` on one workdir both ran to the end, and `metrics.jsonl` held hundreds of steps twice), so the second
    is refused in one line (a UserError, `what` says what runs: "training run") naming the process and host that
    hold the folder. The file, JSON `{pid, host, started}`, appears complete in one step (a hard link that fails
    if it exists), so of two runs starting together exactly one gets it. A lock left by a process that died (on
    this host, its pid no longer alive) or one that cannot be read is taken over; one from another host is
    refused, as its process cannot be checked from here. With many processes only process 0 takes the lock,
    and all of them learn whether it did, so that none goes on into the run's collectives alone."""
    folder = Path(folder)
    path = folder / ".lock"
    held, refused = None, None
    if distributed.is_main_process():
        try:
            held = _take_lock(path, what)
        except UserError as error:
            refused = error
    if distributed.any_process(refused is not None):
        raise refused or UserError(f"{folder}: another {what} is using it (process 0 could not take its lock)")
    try:
        yield
    finally:
        if held is not None and _read_lock(path) == held:  # still ours
            path.unlink(missing_ok=True)


def _take_lock(path: Path, what: str) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    ours = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    draft = path.with_name(f"{path.name}.{ours['pid']}.tmp")
    draft.write_text(json.dumps(ours))
    try:
        for attempt in range(2):
            try:
                os.link(draft, path)
                return ours
            except FileExistsError:
                holder = _read_lock(path)
            stale = holder is None or (holder["host"] == ours["host"] and not _alive(holder["pid"]))
            if attempt == 0 and stale:
                # Removed only if it is still the stale one; when another run took it over first, the retry
                # fails and names that run.
                if _read_lock(path) == holder:
                    path.unlink(missing_ok=True)
                continue
            holder = holder or {"pid": "?", "host": "?"}
            raise UserError(f"{path.parent}: another {what} is using it (process {holder['pid']} on "
                            f"{holder['host']}, since {holder.get('started', '?')}); wait for it to end or use "
                            "another folder")
        raise AssertionError("unreachable")
    finally:
        draft.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's holder, or None when the file is missing or is not a lock."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
        return holder
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
