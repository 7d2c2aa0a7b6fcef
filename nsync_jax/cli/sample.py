"""`nsync-jax sample`: draw images from prompts, with learned embeddings and LoRA files.

With `--captions DIR` or `--prompts-file FILE` it draws a caption-matched set instead (`negatives.generate_set`):
one `<stem>.png` per caption, resumable, the same bytes on any device count; the released `gen_imgs.py`
(img2txt2img: test captions + " in the style of <token>", saved at 256) and `gen_imgs_random_prompts.py`."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.cli.common import DTYPES, SCHEDULERS, add_model_flags, positive_int, process_flags
from nsync_jax.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", parents=[process_flags()],
                              help="draw images from prompts with a Stable Diffusion (1.x, 2.x, XL) model, with "
                                   "learned embeddings and LoRA files")
    add_model_flags(p)
    p.add_argument("--vae", default=None, metavar="DIR_OR_ID",
                   help="another model's VAE decodes, e.g. stabilityai/sd-vae-ft-mse as StyleForge's scripts use "
                        "(a VAE folder, a model folder or a Hub id; it must be a drop-in for the model's own)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several)")
    p.add_argument("--captions", type=Path, default=None,
                   help="instead of --prompt: a folder of <stem>.txt captions, one image <stem>.png per caption "
                        "(img2txt2img: the test images' captions), resumable")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="instead of --prompt: a text file of prompts, one per line, one image img_<line>.png per "
                        "prompt (line numbers from 0, as the released gen_imgs_random_prompts.py), resumable")
    p.add_argument("--num-prompts", type=positive_int, default=None,
                   help="with --prompts-file: draw this many of its prompts at random by --seed (default: all)")
    p.add_argument("--template", default=None,
                   help="with --captions/--prompts-file: the prompt made of each {caption} (or line), e.g. "
                        "'{caption} in the style of <token>' (the released gen_imgs.py) or 'In the style of "
                        "<token>, {caption}' (its random-prompt script; default: '{caption}')")
    p.add_argument("--save-size", type=positive_int, default=None,
                   help="with --captions/--prompts-file: resize before saving (bicubic; the released code saves "
                        "256)")
    p.add_argument("--strict", action="store_true",
                   help="with --captions/--prompts-file: a prompt longer than the text encoder's context is an "
                        "error (default: truncated with a warning)")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of guidance")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the model's own")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="diffusers' guidance_rescale in [0, 1] (0: off; 0.7 against over-exposure at high guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=positive_int, default=None, help="default: the model's resolution")
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--num-images", type=positive_int, default=1,
                   help="images per prompt (per caption: <stem>_<k>.png)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per device per compiled call (the same --batch-size gives the same bytes on any "
                        "number of devices or hosts)")
    p.add_argument("--latents", type=Path, default=None,
                   help="float32 .npy of initial latents in diffusers' layout (N, C, H/8, W/8)")
    p.add_argument("--embeddings", type=Path, action="append", default=[],
                   help="learned embedding file (diffusers or A1111; for SDXL the clip_l/clip_g .safetensors that "
                        "A1111 and ComfyUI share, the token named by the file stem); repeatable")
    p.add_argument("--lora", type=Path, action="append", default=[],
                   help="LoRA .safetensors (diffusers or kohya/A1111 keys), merged into the weights at load; "
                        "repeatable")
    p.add_argument("--lora-scale", type=float, default=1.0, help="weight of every --lora (W + scale * delta)")
    p.add_argument("--negative-lora", type=Path, action="append", default=[],
                   help="LoRA for guidance's negative branch only, in place of --lora there (DreamArtist++'s "
                        "lora-neg.safetensors, with --lora lora.safetensors and no negative word); repeatable")
    p.add_argument("--handoff-timestep", type=int, default=None,
                   help="the base model (without --lora) denoises timesteps at or above this one, the model with "
                        "--lora the rest: for a LoRA trained with train.max_timestep (0: --lora everywhere; "
                        "default: the handoff_timestep the --lora files record, else 0)")
    p.add_argument("--clip-skip", type=int, default=0,
                   help="use the text encoder's k-th layer from the end (SDXL: from the penultimate one, for the "
                        "prompt only, as diffusers)")
    add_micro_conditioning_flags(p)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--attention", choices=("auto", "cudnn", "xla", "einsum"), default="auto",
                   help="attention backend (auto: cuDNN on GPU in bfloat16, einsum otherwise)")
    p.add_argument("--output", type=Path, required=True,
                   help="folder for 000000.png, 000001.png, ... (with --captions/--prompts-file: <stem>.png and "
                        "manifest.json)")
    p.set_defaults(run=run)


def add_micro_conditioning_flags(p) -> None:
    """SDXL's micro-conditioning (diffusers' argument names); refused on SD 1.x/2.x models."""
    for flag, names, default in (("--original-size", ("H", "W"), "the output size"),
                                 ("--crops-coords-top-left", ("Y", "X"), "0 0"),
                                 ("--target-size", ("H", "W"), "the output size")):
        p.add_argument(flag, type=int, nargs=2, metavar=names, default=None,
                       help=f"SDXL micro-conditioning (default: {default})")


def micro_conditioning(args) -> dict:
    """The micro-conditioning flags as `SampleSettings` fields."""
    from nsync_jax.pipeline import MICRO_CONDITIONING

    return {name: tuple(getattr(args, name)) for name in MICRO_CONDITIONING if getattr(args, name) is not None}


def check_sources(args) -> None:
    """One source of prompts, and only the flags that apply to it."""
    given = [flag for flag, value in (("--prompt", args.prompt), ("--captions", args.captions),
                                      ("--prompts-file", args.prompts_file)) if value]
    if len(given) != 1:
        raise UserError(f"give one of --prompt, --captions and --prompts-file, got {' and '.join(given) or 'none'}")
    set_flags = (("--template", args.template), ("--save-size", args.save_size), ("--strict", args.strict))
    misplaced = ([flag for flag, value in set_flags if value] if args.prompt else
                 [flag for flag, value in (("--latents", args.latents),) if value is not None])
    if args.num_prompts is not None and not args.prompts_file:
        misplaced.append("--num-prompts")
    if misplaced:
        raise UserError(f"{given[0]} does not take {' or '.join(misplaced)}")
    if not args.prompt and args.width not in (None, args.height):
        raise UserError(f"{given[0]} draws square images: give --height only")


def run(args) -> None:
    import jax.numpy as jnp

    from nsync_jax.distributed import is_main_process
    from nsync_jax.sampling import SampleSettings, generate_to_folder, load_for_sampling, read_latents

    check_sources(args)
    if args.negative_lora and not args.prompt:
        raise UserError("--negative-lora takes --prompt, not --captions or --prompts-file")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 8:
            raise UserError(f"{flag} must be divisible by 8, got {value}")
    pipe, base, handoff = load_for_sampling(args.model, embeddings=args.embeddings, lora_files=args.lora,
                                            lora_scale=args.lora_scale, handoff_timestep=args.handoff_timestep,
                                            dtype=jnp.dtype(args.dtype), attention_backend=args.attention,
                                            revision=args.revision, variant=args.variant,
                                            model_config=args.model_config, vae=args.vae)
    settings = SampleSettings(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                              guidance_rescale=args.guidance_rescale, height=args.height, width=args.width,
                              clip_skip=args.clip_skip, batch_size=args.batch_size, handoff_timestep=handoff,
                              **micro_conditioning(args))
    negative = None
    if args.negative_lora:  # the same model and embeddings, with the negative branch's LoRA instead
        negative, _, _ = load_for_sampling(args.model, embeddings=args.embeddings, lora_files=args.negative_lora,
                                           lora_scale=args.lora_scale, handoff_timestep=0, dtype=jnp.dtype(args.dtype),
                                           attention_backend=args.attention, revision=args.revision,
                                           variant=args.variant, model_config=args.model_config)
    if not args.prompt:
        draw_set(args, pipe, base, settings)
        return
    num_images = len(args.prompt) * args.num_images
    latents = None if args.latents is None else read_latents(args.latents, pipe, num_images, settings)
    files = generate_to_folder(pipe, args.prompt, args.output, negative_prompt=args.negative_prompt,
                               num_images_per_prompt=args.num_images, seed=args.seed, settings=settings,
                               latents=latents, base=base, negative_model=negative)
    if is_main_process():
        print(f"wrote {len(files)} images to {args.output}")


def draw_set(args, pipe, base, settings) -> None:
    import hashlib

    from nsync_jax.distributed import is_main_process
    from nsync_jax.negatives import generate_set, prepare_prompts

    prompts = prepare_prompts(pipe, args.template or "{caption}", captions=args.captions,
                              prompt_list=args.prompts_file, count=args.num_prompts, seed=args.seed,
                              strict=args.strict)
    lora = [{"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()} for path in args.lora]
    counts = generate_set(pipe, prompts, args.output, settings=settings, seed=args.seed,
                          images_per_caption=args.num_images, save_size=args.save_size,
                          negative_prompt=args.negative_prompt, model_name=str(args.model), base=base,
                          weights={"lora": lora, "lora_scale": args.lora_scale} if lora else None)
    if is_main_process():
        print(f"{args.output}: drew {counts['drawn']} images, kept {counts['kept']}")
