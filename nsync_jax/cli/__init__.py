"""The `nsync-jax` command: one module per subcommand, each with `add_parser(subparsers)` and its `run(args)`.

A subcommand's `run` checks its flags, builds settings, calls the library (one function, or a few) and prints
what it wrote; a `UserError` from anywhere below becomes one line on stderr and exit status 2, here in `main`
and nowhere else. Heavy imports (JAX, the models) happen inside `run`, so `nsync-jax --help` stays quick.
`DESCRIPTION` is what `nsync-jax --help` tells a user.
"""
from __future__ import annotations

import argparse
import sys

from nsync_jax.cli import (caption, convert_weights, data, demo, edit, evaluate, evaluate_edits, export, negatives,
                           sample, toyworld, train)
from nsync_jax.errors import UserError

# In the order `nsync-jax --help` lists them.
COMMANDS = (sample, negatives, caption, data, train, export, evaluate, convert_weights, demo, toyworld, edit,
            evaluate_edits)
DESCRIPTION = """\
Teach Stable Diffusion (1.x, 2.x) a visual style from a few dozen images: train a style token with NSYNC,
Textual Inversion or DreamArtist, or LoRA adapters or the full weights (StyleForge), then sample with it and
export it for diffusers, A1111 or ComfyUI. Runs on a CPU, one GPU, many GPUs or a TPU pod, and resumes after
a crash. Start with `nsync-jax demo --output demo/`; each command below has its own --help."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsync-jax", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `--config.KEY=VALUE` overrides are collected apart from the declared flags.
    overrides = [a for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.config_overrides = overrides
    try:
        if "coordinator" in args:  # the commands with `common.process_flags()`
            from nsync_jax.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id)
        args.run(args)
    except UserError as e:
        print(f"nsync-jax: error: {e}", file=sys.stderr)
        return 2
    return 0
