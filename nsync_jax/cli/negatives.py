"""`nsync-jax negatives`: draw the caption-matched image set NSYNC trains against, with the base model."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.cli.common import DTYPES, SCHEDULERS, add_model_flags, positive_int, process_flags
from nsync_jax.cli.sample import add_micro_conditioning_flags, micro_conditioning
from nsync_jax.errors import UserError


def add_parser(subparsers) -> None:
    from nsync_jax.negatives import DEFAULT_STYLE_PHRASE, DEFAULT_TEMPLATE

    p = subparsers.add_parser(
        "negatives", parents=[process_flags()], help="draw a caption-matched image set with the base model",
        description="One image per caption file <stem>.txt, named <stem>.png (or <stem>_<k>.png). Rerunning "
                    "draws only missing or unreadable images. The same command makes the released code's "
                    "content set (--style-phrase 'a natural image, no styles.') and base-model baseline "
                    "(test captions, --style-phrase 'in the style of Claude Monet').")
    add_model_flags(p)
    p.add_argument("--captions", type=Path, required=True, help="folder of <stem>.txt captions")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--style-phrase", default=DEFAULT_STYLE_PHRASE)
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt from {caption} and {style_phrase}")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of guidance")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the model's own")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=positive_int, default=None, help="default: the model's resolution")
    p.add_argument("--save-size", type=positive_int, default=None, help="resize before saving (bicubic)")
    p.add_argument("--images-per-caption", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per device per compiled call (the same --batch-size gives the same bytes on any "
                        "number of devices or hosts)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--strict", action="store_true", help="a prompt longer than the text encoder's context is "
                                                         "an error (default: truncated with a warning)")
    add_micro_conditioning_flags(p)
    p.set_defaults(run=run)


def run(args) -> None:
    import jax.numpy as jnp

    from nsync_jax.distributed import is_main_process
    from nsync_jax.negatives import generate_set, prepare_prompts
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.sampling import SampleSettings

    pipe = load_pipeline(args.model, dtype=jnp.dtype(args.dtype), revision=args.revision, variant=args.variant,
                         model_config=args.model_config, allow_sdxl=True)
    if args.resolution is not None and args.resolution % pipe.vae_scale_factor:
        raise UserError(f"--resolution must be divisible by {pipe.vae_scale_factor}, got {args.resolution}")
    prompts = prepare_prompts(pipe, args.template, captions=args.captions, strict=args.strict,
                              style_phrase=args.style_phrase)
    settings = SampleSettings(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                              height=args.resolution, batch_size=args.batch_size, **micro_conditioning(args))
    counts = generate_set(pipe, prompts, args.output, settings=settings, seed=args.seed,
                          images_per_caption=args.images_per_caption, save_size=args.save_size,
                          negative_prompt=args.negative_prompt, model_name=str(args.model))
    if is_main_process():
        print(f"{args.output}: drew {counts['drawn']} images, kept {counts['kept']}")
