"""Experiment configs: a Python file with `get_config()` returning an `ml_collections.ConfigDict`,
plus `--config.a.b=value` overrides parsed to the type of the value they replace (as absl's config flags do).
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections

from nsync_jax.errors import UserError


def load_config(path: Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"nsync_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's Python file: any error in it is theirs
        raise UserError(f"{path}: cannot run the config file ({type(e).__name__}: {e})") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: no get_config() function")
    config = module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


def bundled_config(name: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """`configs/<name>.py` of this project (installed as the package `nsync_jax.configs`), with `overrides`."""
    from importlib.resources import as_file, files

    with as_file(files("nsync_jax.configs") / f"{name}.py") as path:
        return load_config(path, overrides)


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Applies `a.b=value` (the `--config.` prefix already removed or not)."""
    key, sep, text = override.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise UserError(f"--config.{key}: expected --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise UserError(f"--config.{key}: no such config key")
        node = node[part]
    if leaf not in node:
        raise UserError(f"--config.{key}: no such config key")
    node[leaf] = _parse_like(node[leaf], text, key)


def _parse_like(current, text: str, key: str):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise UserError(f"--config.{key}={text}: not a valid {type(current).__name__}") from None
    if current is None or isinstance(value, type(current)) or (isinstance(current, float) and isinstance(value, int)):
        return type(current)(value) if isinstance(current, float) else value
    raise UserError(f"--config.{key}={text}: expected a {type(current).__name__}")
