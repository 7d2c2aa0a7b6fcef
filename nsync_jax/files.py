"""Writing files and folders atomically: to a temporary name in the same folder, then one rename, so that a
kill or a full disk never leaves a half-written file or folder under the real name."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from nsync_jax.errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(temporary_path)`, then renames the result to `path` (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path, *, replace: bool = False,
                  exists_hint: str = "choose a new folder") -> Iterator[Path]:
    """Yields an empty temporary sibling folder `.NAME.tmp-<pid>` to write into; when the block ends without an
    error it is renamed to `path`, otherwise removed. An existing `path` is refused on entry (UserError
    "PATH: already exists; <exists_hint>"), before any work, unless `replace`: then it is removed just before
    the rename."""
    path = Path(path)
    if path.exists() and not replace:
        raise UserError(f"{path}: already exists; {exists_hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)  # left by a killed run that had the same process id
    temporary.mkdir()
    try:
        yield temporary
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, value, **dumps_options) -> None:
    write_text(path, json.dumps(value, indent=2, **dumps_options) + "\n")
