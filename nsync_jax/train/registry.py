"""Name -> object tables for the parts a run picks by name in its config (methods, trainables)."""
from __future__ import annotations

from typing import TypeVar

from nsync_jax.errors import UserError

T = TypeVar("T")


class Registry(dict[str, T]):
    """Entries by their `name`; `find` is the lookup a config key goes through."""

    def __init__(self, config_key: str):
        super().__init__()
        self.config_key = config_key

    def register(self, entry: T) -> T:
        self[entry.name] = entry
        return entry

    def find(self, name: str) -> T:
        if name not in self:
            raise UserError(f"config {self.config_key}={name!r} must be one of {', '.join(self)}")
        return self[name]
