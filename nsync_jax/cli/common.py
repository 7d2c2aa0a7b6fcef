"""What several subcommands share: flag types, the model flags, the multi-process flags, and configs built from
overrides."""
from __future__ import annotations

import argparse

SCHEDULERS = ("ddim", "pndm", "euler", "dpm")
DTYPES = ("float32", "bfloat16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_flags(parser: argparse.ArgumentParser, *, required: bool = True, default_help: str = "") -> None:
    """`--model`, `--revision`, `--variant`, `--model-config`: a Stable Diffusion model, named as
    `pipeline.load_pipeline` takes it. Pass `args.model`, `args.revision`, `args.variant` and `args.model_config` on
    to it."""
    parser.add_argument("--model", required=required, default=None,
                        help="a diffusers folder, a Hugging Face Hub id (org/name), or a single-file checkpoint "
                             "(.safetensors or .ckpt, A1111 / original LDM layout)" + default_help)
    parser.add_argument("--revision", default=None,
                        help="of a Hub id: branch, tag or commit (default: main); read from the Hugging Face cache "
                             "when HF_HUB_OFFLINE=1")
    parser.add_argument("--variant", default=None,
                        help="weight files of this variant, e.g. fp16 for *.fp16.safetensors")
    parser.add_argument("--model-config", default=None, metavar="DIR_OR_ID",
                        help="of a single-file checkpoint: a diffusers folder or Hub id with its architecture's "
                             "configs, or sd1, sd2-base, sd2-v, sdxl-base (default: detected, as diffusers does)")


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
