"""`nsync-jax train`: learn a style from an experiment file, into a workdir that a rerun resumes."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.cli.common import process_flags


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", parents=[process_flags()],
                              help="learn a style: a token, LoRA adapters or the full weights (NSYNC, Textual "
                                   "Inversion, DreamArtist, StyleForge)",
                              epilog="Override any config value with --config.KEY=VALUE, e.g. --config.train.steps=100")
    p.add_argument("--config", type=Path, required=True, help="experiment file with get_config()")
    p.add_argument("--workdir", type=Path, required=True, help="checkpoints, metrics and outputs; rerun to resume")
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax.config import load_config
    from nsync_jax.distributed import is_main_process
    from nsync_jax.train.trainer import train

    result = train(load_config(args.config, args.config_overrides), args.workdir)
    if is_main_process():
        wrote = ", ".join(map(str, result.files or [result.checkpoints]))
        print(f"wrote {wrote} (nsync-jax export --workdir {args.workdir} --format "
              f"{'|'.join(result.export_formats)} writes the run for diffusers, A1111 or ComfyUI)")
