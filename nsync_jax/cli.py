"""The `nsync-jax` command line: parse flags, call the library, report user errors in one line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nsync_jax.errors import UserError

SCHEDULERS = ("ddim", "pndm", "euler", "dpm")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="text-to-image sampling from a diffusers-format model folder")
    p.add_argument("--model", type=Path, required=True, help="diffusers-format Stable Diffusion folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of guidance")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the model's own")
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=_positive_int, default=None, help="default: the model's resolution")
    p.add_argument("--width", type=_positive_int, default=None)
    p.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per compiled call")
    p.add_argument("--latents", type=Path, default=None,
                   help="float32 .npy of initial latents in diffusers' layout (N, C, H/8, W/8)")
    p.add_argument("--embeddings", type=Path, action="append", default=[],
                   help="learned embedding file (diffusers or A1111); repeatable")
    p.add_argument("--clip-skip", type=int, default=0, help="use the text encoder's k-th layer from the end")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--attention", choices=("auto", "cudnn", "xla", "einsum"), default="auto",
                   help="attention backend (auto: cuDNN on GPU in bfloat16, einsum otherwise)")
    p.add_argument("--output", type=Path, required=True, help="folder for 000000.png, 000001.png, ...")
    p.set_defaults(run=_run_sample)


def _load_latents(path: Path, expected_nchw: tuple[int, ...]):
    import numpy as np

    try:
        latents = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read latents ({e})") from None
    if latents.shape != expected_nchw:
        raise UserError(f"{path}: latents have shape {latents.shape}, expected {expected_nchw} (N, C, H/f, W/f)")
    return latents.astype(np.float32).transpose(0, 2, 3, 1)


def _run_sample(args) -> None:
    import jax.numpy as jnp

    from nsync_jax.imageio import write_png
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.sampling import SampleSettings, generate

    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 8:
            raise UserError(f"{flag} must be divisible by 8, got {value}")
    pipe = load_pipeline(args.model, dtype=jnp.dtype(args.dtype), attention_backend=args.attention)
    for path in args.embeddings:
        pipe.add_embeddings(path)
    settings = SampleSettings(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                              height=args.height, width=args.width, clip_skip=args.clip_skip,
                              batch_size=args.batch_size)
    latents = None
    if args.latents is not None:
        height = args.height or pipe.default_resolution
        width = args.width or pipe.default_resolution
        f = pipe.vae_scale_factor
        expected = (len(args.prompt) * args.num_images, pipe.unet.config.in_channels, height // f, width // f)
        latents = _load_latents(args.latents, expected)
    args.output.mkdir(parents=True, exist_ok=True)

    def save(first, images):
        for offset, image in enumerate(images):
            write_png(args.output / f"{first + offset:06d}.png", image)

    generate(pipe, args.prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
             seed=args.seed, settings=settings, latents=latents, on_batch=save)
    print(f"wrote {len(args.prompt) * args.num_images} images to {args.output}")


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="learn a style token (NSYNC or Textual Inversion)",
                              epilog="Override any config value with --config.KEY=VALUE, e.g. --config.train.steps=100")
    p.add_argument("--config", type=Path, required=True, help="experiment file with get_config()")
    p.add_argument("--workdir", type=Path, required=True, help="checkpoints, metrics and outputs; rerun to resume")
    p.set_defaults(run=_run_train)


def _run_train(args) -> None:
    from nsync_jax.config import load_config
    from nsync_jax.train.trainer import train

    config = load_config(args.config, args.config_overrides)
    train(config, args.workdir)
    print(f"wrote {args.workdir / 'learned_embeds.safetensors'}")


def _add_export_parser(subparsers) -> None:
    from nsync_jax.export import FORMATS

    p = subparsers.add_parser("export", help="write a checkpoint's learned embeddings for diffusers or A1111")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--format", choices=FORMATS, default="diffusers")
    p.set_defaults(run=_run_export)


def _run_export(args) -> None:
    import ml_collections

    from nsync_jax.export import write_embeddings
    from nsync_jax.train.trainer import export_metadata, read_checkpoint_rows

    rows, meta = read_checkpoint_rows(args.workdir, args.step)
    config = ml_collections.ConfigDict(meta["config"])
    write_embeddings(args.output, config.placeholder_token, rows, fmt=args.format,
                     metadata=export_metadata(config, meta["step"]))
    print(f"wrote {args.output} ({config.placeholder_token}, {rows.shape[0]} vectors, step {meta['step']})")


def _config_with_overrides(default_config, overrides):
    from nsync_jax.config import apply_override

    config = default_config()
    for override in overrides:
        apply_override(config, override)
    return config


def _add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the bundled end-to-end job: learn a held-out toy-world style with TI and NSYNC, and judge it",
        epilog="Override any setting with --config.KEY=VALUE, e.g. --config.style=zigzag --config.train.steps=200")
    p.add_argument("--output", type=Path, required=True, help="folder for every artefact (report.md, grid.png, ...)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> None:
    from nsync_jax.toyworld import demo

    config = _config_with_overrides(demo.default_config, args.config_overrides)
    scores = demo.run_demo(config, args.output)
    best = max((m for m in config.methods), key=lambda m: scores[m]["style"])
    print(f"wrote {args.output / 'report.md'} and {args.output / 'grid.png'}; best held-out style accuracy: "
          f"{best} {scores[best]['style']:.2f} (content {scores[best]['content']:.2f})")


def _add_toyworld_parser(subparsers) -> None:
    p = subparsers.add_parser("toyworld", help="pretrain the bundled toy-world model or its judge")
    commands = p.add_subparsers(dest="toyworld_command", required=True)
    pretrain = commands.add_parser("pretrain", help="train the tiny Stable Diffusion from scratch on the world",
                                   epilog="Override any setting with --config.KEY=VALUE, e.g. --config.unet.steps=100")
    pretrain.add_argument("--output", type=Path, required=True, help="the diffusers-format model folder to write")
    pretrain.set_defaults(run=_run_pretrain)
    evaluate = commands.add_parser("evaluate", help="how often a model draws what seen-style captions ask (judged)",
                                   epilog="Sampler settings come from the demo config: --config.sample.steps=...")
    evaluate.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    evaluate.add_argument("--count", type=_positive_int, default=200, help="captions to draw")
    evaluate.set_defaults(run=_run_evaluate)
    judge = commands.add_parser("judge", help="train the style/shape/colour classifier on ground-truth renders")
    judge.add_argument("--output", type=Path, required=True)
    judge.add_argument("--seed", type=int, default=0)
    judge.set_defaults(run=_run_judge)


def _run_pretrain(args) -> None:
    from nsync_jax.toyworld import pretrain

    config = _config_with_overrides(pretrain.default_config, args.config_overrides)
    pretrain.pretrain(config, args.output)
    print(f"wrote {args.output}")


def _run_evaluate(args) -> None:
    import json

    from nsync_jax.toyworld import demo

    config = _config_with_overrides(demo.default_config, args.config_overrides)
    if args.model is not None:
        config.model = str(args.model)
    print(json.dumps(demo.prompt_following(config, args.count), indent=2))


def _run_judge(args) -> None:
    from nsync_jax.toyworld import judge

    judge.main(["--output", str(args.output), "--seed", str(args.seed)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsync-jax", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_sample_parser(subparsers)
    _add_train_parser(subparsers)
    _add_export_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_toyworld_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `--config.KEY=VALUE` overrides are collected apart from the declared flags.
    overrides = [a for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.config_overrides = overrides
    try:
        args.run(args)
    except UserError as e:
        print(f"nsync-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
