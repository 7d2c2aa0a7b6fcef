"""`nsync-jax toyworld`: pretrain the bundled toy-world model or its judge, or measure a model's prompt following."""
from __future__ import annotations

import argparse
from pathlib import Path

from nsync_jax.cli.common import add_model_flags, config_with_overrides, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("toyworld", help="pretrain the bundled toy-world model or its judge, or measure how "
                                               "well a model follows captions")
    commands = p.add_subparsers(dest="toyworld_command", required=True)
    pretrain = commands.add_parser("pretrain", help="train the tiny Stable Diffusion from scratch on the world",
                                   epilog="Override any setting with --config.KEY=VALUE, e.g. --config.unet.steps=100")
    pretrain.add_argument("--output", type=Path, required=True, help="the diffusers-format model folder to write")
    pretrain.add_argument("--checkpoint-every", type=_checkpoint_interval, default=500, metavar="STEPS",
                          help="save the training state in OUTPUT.checkpoints every STEPS steps (a multiple of 50, "
                               "the loss curve's interval); a killed run, rerun, goes on from there")
    pretrain.set_defaults(run=run_pretrain)
    evaluate = commands.add_parser("evaluate", help="how often a model draws what seen-style captions ask (judged)",
                                   epilog="Sampler settings come from the demo config: --config.sample.steps=...")
    add_model_flags(evaluate, required=False, default_help="; default: the bundled model")
    evaluate.add_argument("--count", type=positive_int, default=200, help="captions to draw")
    evaluate.set_defaults(run=run_evaluate)
    judge = commands.add_parser("judge", help="train the style/shape/colour classifier on ground-truth renders")
    judge.add_argument("--output", type=Path, required=True)
    judge.add_argument("--seed", type=int, default=0)
    judge.add_argument("--vae", default=None, help="VAE folder whose round trips it also trains on "
                                                   "(default: the bundled model's; '' for none)")
    judge.set_defaults(run=run_judge)


def _checkpoint_interval(text: str) -> int:
    from nsync_jax.toyworld.pretrain import LOG_EVERY

    value = positive_int(text)
    if value % LOG_EVERY:
        raise argparse.ArgumentTypeError(f"must be a multiple of {LOG_EVERY}, got {value}")
    return value


def run_pretrain(args) -> None:
    from nsync_jax import distributed
    from nsync_jax.toyworld import pretrain

    config = config_with_overrides(pretrain.default_config, args.config_overrides)
    distributed.use_cpu_devices(config.cpu_devices)
    pretrain.pretrain(config, args.output, checkpoint_every=args.checkpoint_every)
    print(f"wrote {args.output}")


def run_evaluate(args) -> None:
    import json

    from nsync_jax import distributed
    from nsync_jax.toyworld import demo

    config = config_with_overrides(demo.default_config, args.config_overrides)
    if args.model is not None:
        config.model = str(args.model)
    distributed.use_cpu_devices(config.cpu_devices)
    print(json.dumps(demo.prompt_following(config, args.count, revision=args.revision, variant=args.variant,
                                           model_config=args.model_config), indent=2))


def run_judge(args) -> None:
    from nsync_jax.toyworld import judge

    judge.main(["--output", str(args.output), "--seed", str(args.seed)]
               + (["--vae", args.vae] if args.vae is not None else []))
