"""What several subcommands share: flag types, the multi-process flags, and configs built from overrides."""
from __future__ import annotations

import argparse

SCHEDULERS = ("ddim", "pndm", "euler", "dpm")
DTYPES = ("float32", "bfloat16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def process_flags() -> argparse.ArgumentParser:
    """Flags of commands that run on several processes (one per host); see launch/ for the launchers.

    `main` initialises the processes from them before a command runs, for every command that has them."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("multi-process runs (not needed under SLURM or on TPU pods, where they are detected)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=positive_int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    return p


def config_with_overrides(default_config, overrides):
    """`default_config()` with each `--config.KEY=VALUE` of `overrides` applied."""
    from nsync_jax.config import apply_override

    config = default_config()
    for override in overrides:
        apply_override(config, override)
    return config
