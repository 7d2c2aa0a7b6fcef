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


def _process_flags() -> argparse.ArgumentParser:
    """Flags of commands that run on several processes (one per host); see launch/ for the launchers."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("multi-process runs (not needed under SLURM or on TPU pods, where they are detected)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=_positive_int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    return p


def _add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", parents=[_process_flags()],
                              help="text-to-image sampling from a diffusers-format model folder")
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
    p.add_argument("--lora", type=Path, action="append", default=[],
                   help="LoRA .safetensors (diffusers or kohya/A1111 keys), merged into the weights at load; "
                        "repeatable")
    p.add_argument("--lora-scale", type=float, default=1.0, help="weight of every --lora (W + scale * delta)")
    p.add_argument("--handoff-timestep", type=int, default=None,
                   help="the base model (without --lora) denoises timesteps at or above this one, the model with "
                        "--lora the rest: for a LoRA trained with train.max_timestep (0: --lora everywhere; "
                        "default: the handoff_timestep the --lora files record, else 0)")
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


def _recorded_handoff(lora_files: list[Path]) -> int:
    """The handoff timestep the LoRA files were trained for (their `train.max_timestep`), 0 where none is."""
    from nsync_jax.lora import read_lora_metadata

    recorded = {}
    for path in lora_files:
        value = read_lora_metadata(path).get("handoff_timestep") or 0
        if not isinstance(value, int) or value < 0:
            raise UserError(f"{path}: header key 'handoff_timestep' must be a non-negative integer, got {value!r}")
        recorded[path] = value
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{path}: {value}" for path, value in recorded.items())
        raise UserError(f"the --lora files record different handoff timesteps ({listed}); pass --handoff-timestep")
    return next(iter(recorded.values()), 0)


def _run_sample(args) -> None:
    import jax.numpy as jnp

    from nsync_jax.distributed import is_main_process
    from nsync_jax.imageio import write_png
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.sampling import SampleSettings, generate

    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 8:
            raise UserError(f"{flag} must be divisible by 8, got {value}")
    if args.handoff_timestep is None:
        args.handoff_timestep = _recorded_handoff(args.lora)
    if args.handoff_timestep and not args.lora:
        raise UserError("--handoff-timestep needs --lora: it hands the low timesteps to the LoRA's weights")
    if args.handoff_timestep < 0:
        raise UserError(f"--handoff-timestep must not be negative, got {args.handoff_timestep}")

    def load_with_embeddings():
        loaded = load_pipeline(args.model, dtype=jnp.dtype(args.dtype), attention_backend=args.attention)
        for path in args.embeddings:
            loaded.add_embeddings(path)
        return loaded

    pipe = load_with_embeddings()
    base = load_with_embeddings() if args.handoff_timestep else None  # the --lora weights stay out of it
    if args.lora:
        from nsync_jax.lora import merge_lora, read_lora_file

        for path in args.lora:
            merge_lora(pipe.modules(), read_lora_file(path), args.lora_scale, source=path)
    settings = SampleSettings(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                              height=args.height, width=args.width, clip_skip=args.clip_skip,
                              batch_size=args.batch_size, handoff_timestep=args.handoff_timestep)
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

    main_process = is_main_process()
    generate(pipe, args.prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
             seed=args.seed, settings=settings, latents=latents, on_batch=save if main_process else None,
             base=base)
    if main_process:
        print(f"wrote {len(args.prompt) * args.num_images} images to {args.output}")


def _add_negatives_parser(subparsers) -> None:
    from nsync_jax.negatives import DEFAULT_STYLE_PHRASE, DEFAULT_TEMPLATE

    p = subparsers.add_parser(
        "negatives", parents=[_process_flags()], help="draw a caption-matched image set with the base model",
        description="One image per caption file <stem>.txt, named <stem>.png (or <stem>_<k>.png). Rerunning "
                    "draws only missing or unreadable images. The same command makes the released code's "
                    "content set (--style-phrase 'a natural image, no styles.') and base-model baseline "
                    "(test captions, --style-phrase 'in the style of Claude Monet').")
    p.add_argument("--model", type=Path, required=True, help="diffusers-format Stable Diffusion folder")
    p.add_argument("--captions", type=Path, required=True, help="folder of <stem>.txt captions")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--style-phrase", default=DEFAULT_STYLE_PHRASE)
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt from {caption} and {style_phrase}")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of guidance")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the model's own")
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=_positive_int, default=None, help="default: the model's resolution")
    p.add_argument("--save-size", type=_positive_int, default=None, help="resize before saving (bicubic)")
    p.add_argument("--images-per-caption", type=_positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per compiled call")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--strict", action="store_true", help="a prompt longer than the text encoder's context is "
                                                         "an error (default: truncated with a warning)")
    p.set_defaults(run=_run_negatives)


def _run_negatives(args) -> None:
    import jax.numpy as jnp

    from nsync_jax.distributed import is_main_process
    from nsync_jax.negatives import generate_set, prepare_prompts
    from nsync_jax.pipeline import load_pipeline
    from nsync_jax.sampling import SampleSettings

    pipe = load_pipeline(args.model, dtype=jnp.dtype(args.dtype))
    if args.resolution is not None and args.resolution % pipe.vae_scale_factor:
        raise UserError(f"--resolution must be divisible by {pipe.vae_scale_factor}, got {args.resolution}")
    prompts = prepare_prompts(pipe, args.captions, args.template, args.style_phrase, args.strict)
    settings = SampleSettings(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                              height=args.resolution, batch_size=args.batch_size)
    counts = generate_set(pipe, prompts, args.output, settings=settings, seed=args.seed,
                          images_per_caption=args.images_per_caption, save_size=args.save_size,
                          negative_prompt=args.negative_prompt, model_name=str(args.model))
    if is_main_process():
        print(f"{args.output}: drew {counts['drawn']} images, kept {counts['kept']}")


def _add_caption_parser(subparsers) -> None:
    p = subparsers.add_parser("caption", help="caption a folder of images with a local image-to-text model",
                              description="Writes <stem>.txt per image with a transformers image-to-text model "
                                          "folder (BLIP, BLIP-2, LLaVA-style), on the CPU build of torch.")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="folder for the <stem>.txt captions")
    p.add_argument("--model", type=Path, required=True, help="the captioner's transformers model folder")
    p.add_argument("--prompt", default="", help="text the caption continues (e.g. 'a painting of')")
    p.add_argument("--max-words", type=_positive_int, default=25)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--overwrite", action="store_true", help="recaption images that already have a caption")
    p.set_defaults(run=_run_caption)


def _run_caption(args) -> None:
    from nsync_jax.captions import caption_folder

    counts = caption_folder(args.images, args.output, args.model, prompt=args.prompt, max_words=args.max_words,
                            overwrite=args.overwrite, batch_size=args.batch_size)
    print(f"{args.output}: wrote {counts['written']} captions, kept {counts['kept']}")


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", parents=[_process_flags()],
                              help="learn a style: a token, LoRA adapters or the full weights (NSYNC, Textual "
                                   "Inversion, DreamArtist, StyleForge)",
                              epilog="Override any config value with --config.KEY=VALUE, e.g. --config.train.steps=100")
    p.add_argument("--config", type=Path, required=True, help="experiment file with get_config()")
    p.add_argument("--workdir", type=Path, required=True, help="checkpoints, metrics and outputs; rerun to resume")
    p.set_defaults(run=_run_train)


def _run_train(args) -> None:
    from nsync_jax.config import load_config
    from nsync_jax.distributed import is_main_process
    from nsync_jax.train.trainer import train

    result = train(load_config(args.config, args.config_overrides), args.workdir)
    if is_main_process():
        wrote = ", ".join(map(str, result.files or [result.checkpoints]))
        print(f"wrote {wrote} (nsync-jax export writes them for diffusers or A1111)")


def _add_export_parser(subparsers) -> None:
    from nsync_jax.export import FORMATS, MODEL_FORMATS

    p = subparsers.add_parser("export", help="write a checkpoint's learned embeddings for diffusers or A1111, "
                                             "or a LoRA / fine-tuned model for diffusers",
                              epilog="DreamArtist runs also write the negative word next to --output, as "
                                     "NAME-neg.EXT (token <token>-neg). LoRA runs: --format diffusers-lora (a "
                                     ".safetensors for load_lora_weights), a1111-lora (kohya-ss's layout, for "
                                     "A1111, ComfyUI and load_lora_weights; sample --lora reads both) or "
                                     "diffusers-pipeline; full runs: --format diffusers-pipeline (a new model "
                                     "folder).")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--format", choices=FORMATS + MODEL_FORMATS, default="diffusers")
    p.set_defaults(run=_run_export)


def _run_export(args) -> None:
    from nsync_jax.train.trainer import export_run

    print(export_run(args.workdir, args.output, args.format, args.step))


def _config_with_overrides(default_config, overrides):
    from nsync_jax.config import apply_override

    config = default_config()
    for override in overrides:
        apply_override(config, override)
    return config


def _add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the bundled end-to-end job: learn a held-out toy-world style with TI, NSYNC and "
                     "DreamArtist, and judge it",
        epilog="Override any setting with --config.KEY=VALUE, e.g. --config.style=zigzag --config.train.steps=200")
    p.add_argument("--output", type=Path, required=True, help="folder for every artefact (report.md, grid.png, ...)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> None:
    from nsync_jax import distributed
    from nsync_jax.toyworld import demo

    config = _config_with_overrides(demo.default_config, args.config_overrides)
    distributed.use_cpu_devices(config.cpu_devices)
    scores = demo.run_demo(config, args.output)
    best = max((m for m in config.methods), key=lambda m: scores[m]["style"])
    print(f"wrote {args.output / 'report.md'} and {args.output / 'grid.png'}; best held-out style accuracy: "
          f"{best} {scores[best]['style']:.2f} (content {scores[best]['content']:.2f})")

def _add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare a style dataset as a tensorflow-datasets dataset")
    commands = p.add_subparsers(dest="data_command", required=True)
    prepare = commands.add_parser(
        "prepare", help="validate a style dataset and write it as array_record (train with --config.data.prepared)",
        epilog="SOURCE is NSYNC's layout (images/, captions/, negatives/) or an extracted CycleGAN folder "
               "(trainA/, testA/, ...), whose captions and negatives have one subfolder per split.")
    prepare.add_argument("source", type=Path)
    prepare.add_argument("--captions", type=Path, default=None, help="default: SOURCE/captions if present")
    prepare.add_argument("--negatives", type=Path, default=None, help="default: SOURCE/negatives if present")
    prepare.add_argument("--output", type=Path, required=True, help="a new folder")
    prepare.add_argument("--skip-bad-items", action="store_true",
                         help="leave out items with a missing caption or negative or an unreadable image")
    prepare.set_defaults(run=_run_data_prepare)


def _run_data_prepare(args) -> None:
    from nsync_jax.data import tfds_style

    counts = tfds_style.prepare(args.output, args.source, captions=args.captions, negatives=args.negatives,
                                skip_bad_items=args.skip_bad_items)
    print(f"wrote {args.output}: " + ", ".join(f"{split} {n} examples" for split, n in counts.items()))


def _add_evaluate_parser(subparsers) -> None:
    from nsync_jax.evaluate import METRICS, PROTOCOLS

    p = subparsers.add_parser("evaluate", help="FID, KID, CMMD, CSD and CLIP score of generated against real images",
                              epilog="Convert the networks into --weights with `nsync-jax convert-weights`.")
    p.add_argument("--real", type=Path, required=True, help="folder of real (reference style) images")
    p.add_argument("--generated", type=Path, required=True, help="folder of generated images")
    p.add_argument("--captions", type=Path, default=None, help="<stem>.txt per generated image (clip metric)")
    p.add_argument("--metrics", default="fid,kid,cmmd,csd", help=f"comma-separated, from {','.join(METRICS)}")
    p.add_argument("--weights", type=Path, required=True, help="folder of converted metric networks")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                   help="standard tools' choices, or the NSYNC paper's scripts'")
    p.add_argument("--output", type=Path, required=True, help="JSON file to write")
    p.add_argument("--batch-size", type=_positive_int, default=50)
    p.add_argument("--seed", type=int, default=0, help="KID subsets and the FID bootstrap")
    p.add_argument("--kid-subset-size", type=_positive_int, default=1000)
    p.add_argument("--kid-subsets", type=_positive_int, default=100)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> None:
    from nsync_jax import evaluate
    from nsync_jax.files import write_json

    settings = evaluate.Evaluation(protocol=args.protocol, metrics=tuple(m for m in args.metrics.split(",") if m),
                                   weights=args.weights, batch_size=args.batch_size, seed=args.seed,
                                   kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets)
    result = evaluate.evaluate(settings, args.real, args.generated, args.captions)
    write_json(args.output, result)
    print(evaluate.table(result))
    print(f"wrote {args.output}")


def _add_edit_parser(subparsers) -> None:
    from nsync_jax.editing.editor import DEFAULT_CUT_WEIGHT, METHODS, REFERENCE_STORAGE

    p = subparsers.add_parser(
        "edit", help="zero-shot image editing: pix2pix-zeroCon, pix2pix-zero or SDEdit",
        description="Edits images from --source to --target (pix2pix-zero's sentence-bank direction) or towards "
                    "--target-prompt, and writes edited.png, reconstruction.png, attention.png (the edited word's "
                    "cross-attention over the reconstruction and the edit) and edit.json into --output (one "
                    "folder per image when there are several).")
    p.add_argument("--model", type=Path, required=True, help="diffusers-format Stable Diffusion folder")
    p.add_argument("--image", type=Path, action="append", required=True,
                   help="image file or folder of images (repeatable); several images are edited in batches")
    p.add_argument("--source", default=None, help="the concept to replace, e.g. cat")
    p.add_argument("--target", default=None, help="the concept to put in its place, e.g. dog")
    p.add_argument("--target-prompt", default=None, help="edit towards this sentence instead of a word pair")
    caption = p.add_mutually_exclusive_group()
    caption.add_argument("--caption", action="append", default=None,
                         help="the image's caption (once for all images, or once per image)")
    caption.add_argument("--captioner", type=Path, default=None, help="a transformers image-to-text model folder")
    p.add_argument("--directions", type=Path, default=None,
                   help="folder of sentence banks <word>.txt, one sentence per line (default: built from "
                        "templates); their embeddings are cached there")
    p.add_argument("--method", choices=METHODS, default="zerocon")
    p.add_argument("--xa-guidance", type=float, default=0.1, help="step size on the cross-attention loss")
    p.add_argument("--cut-weight", type=float, default=None,
                   help=f"step size on the patch-wise contrastive loss (default {DEFAULT_CUT_WEIGHT}; 0 for "
                        "pix2pix-zero)")
    p.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps of the inversion and the edit")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale, the caption as negative prompt")
    p.add_argument("--inversion-regularization", action=argparse.BooleanOptionalAction, default=True,
                   help="pix2pix-zero's auto-correlation and KL regularisation of the inverted noise")
    p.add_argument("--strength", type=float, default=0.5, help="SDEdit: how far the image is noised (0-1]")
    p.add_argument("--reference", choices=REFERENCE_STORAGE, default="recompute",
                   help="recompute the reference pass next to the edit (least memory) or keep its attention on "
                        "the host in bfloat16 (one UNet call fewer per step)")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="resize every image to N x N (Lanczos) first")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="images per compiled call (each needs about 10 GB more at 512 px in float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--output", type=Path, required=True)
    p.set_defaults(run=_run_edit)


def _run_edit(args) -> None:
    import jax.numpy as jnp

    from nsync_jax.editing.editor import EditSettings, edit_files, read_images
    from nsync_jax.editing.inversion import NoiseRegularization
    from nsync_jax.pipeline import load_pipeline

    inputs = read_images(args.image, args.resolution)
    settings = EditSettings(
        method=args.method, steps=args.steps, guidance=args.guidance, xa_guidance=args.xa_guidance,
        cut_weight=args.cut_weight, regularization=NoiseRegularization() if args.inversion_regularization else None,
        strength=args.strength, reference=args.reference, batch_size=args.batch_size).checked()
    pipe = load_pipeline(args.model, dtype=jnp.dtype(args.dtype))
    folders = edit_files(pipe, inputs, args.output, source=args.source, target=args.target,
                         target_prompt=args.target_prompt, captions=args.caption, captioner=args.captioner,
                         banks=args.directions, settings=settings, seed=args.seed)
    print(f"wrote {', '.join(str(f / 'edited.png') for f in folders)}")


CONVERSIONS = ("inception-fid", "inception-torchvision", "openai-clip", "csd")


def _add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser("convert-weights", help="convert a metric network's PyTorch weights for `evaluate`",
                              epilog="inception-fid: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; "
                                     "inception-torchvision: torchvision's inception_v3_google-0cc3c7bd.pth; "
                                     "openai-clip: OpenAI's ViT-L-14(-336px).pt; csd: the CSD checkpoint. "
                                     "These need the torch extra.")
    p.add_argument("kind", choices=CONVERSIONS)
    p.add_argument("source", type=Path, help="the PyTorch file")
    p.add_argument("destination", type=Path, help="a .safetensors file (Inception) or a folder (CLIP, CSD)")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> None:
    if args.kind.startswith("inception-"):
        from nsync_jax.models.inception import convert_inception

        convert_inception(args.source, args.destination, args.kind.removeprefix("inception-"))
    else:
        from nsync_jax.models import clip_vision

        convert = clip_vision.convert_openai_clip if args.kind == "openai-clip" else clip_vision.convert_csd
        convert(args.source, args.destination)
    print(f"wrote {args.destination}")


def _add_toyworld_parser(subparsers) -> None:
    p = subparsers.add_parser("toyworld", help="pretrain the bundled toy-world model or its judge")
    commands = p.add_subparsers(dest="toyworld_command", required=True)
    pretrain = commands.add_parser("pretrain", help="train the tiny Stable Diffusion from scratch on the world",
                                   epilog="Override any setting with --config.KEY=VALUE, e.g. --config.unet.steps=100")
    pretrain.add_argument("--output", type=Path, required=True, help="the diffusers-format model folder to write")
    pretrain.add_argument("--checkpoint-every", type=_checkpoint_interval, default=500, metavar="STEPS",
                          help="save the training state in OUTPUT.checkpoints every STEPS steps (a multiple of 50, "
                               "the loss curve's interval); a killed run, rerun, goes on from there")
    pretrain.set_defaults(run=_run_pretrain)
    evaluate = commands.add_parser("evaluate", help="how often a model draws what seen-style captions ask (judged)",
                                   epilog="Sampler settings come from the demo config: --config.sample.steps=...")
    evaluate.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    evaluate.add_argument("--count", type=_positive_int, default=200, help="captions to draw")
    evaluate.set_defaults(run=_run_toyworld_evaluate)
    judge = commands.add_parser("judge", help="train the style/shape/colour classifier on ground-truth renders")
    judge.add_argument("--output", type=Path, required=True)
    judge.add_argument("--seed", type=int, default=0)
    judge.add_argument("--vae", default=None, help="VAE folder whose round trips it also trains on "
                                                   "(default: the bundled model's; '' for none)")
    judge.set_defaults(run=_run_judge)


def _checkpoint_interval(text: str) -> int:
    from nsync_jax.toyworld.pretrain import LOG_EVERY

    value = _positive_int(text)
    if value % LOG_EVERY:
        raise argparse.ArgumentTypeError(f"must be a multiple of {LOG_EVERY}, got {value}")
    return value


def _run_pretrain(args) -> None:
    from nsync_jax import distributed
    from nsync_jax.toyworld import pretrain

    config = _config_with_overrides(pretrain.default_config, args.config_overrides)
    distributed.use_cpu_devices(config.cpu_devices)
    pretrain.pretrain(config, args.output, checkpoint_every=args.checkpoint_every)
    print(f"wrote {args.output}")


def _run_toyworld_evaluate(args) -> None:
    import json

    from nsync_jax import distributed
    from nsync_jax.toyworld import demo

    config = _config_with_overrides(demo.default_config, args.config_overrides)
    if args.model is not None:
        config.model = str(args.model)
    distributed.use_cpu_devices(config.cpu_devices)
    print(json.dumps(demo.prompt_following(config, args.count), indent=2))


def _run_judge(args) -> None:
    from nsync_jax.toyworld import judge

    judge.main(["--output", str(args.output), "--seed", str(args.seed)]
               + (["--vae", args.vae] if args.vae is not None else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsync-jax", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_sample_parser(subparsers)
    _add_negatives_parser(subparsers)
    _add_caption_parser(subparsers)
    _add_data_parser(subparsers)
    _add_train_parser(subparsers)
    _add_export_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_convert_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_toyworld_parser(subparsers)
    _add_edit_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `--config.KEY=VALUE` overrides are collected apart from the declared flags.
    overrides = [a for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.config_overrides = overrides
    try:
        if "coordinator" in args:
            from nsync_jax.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id)
        args.run(args)
    except UserError as e:
        print(f"nsync-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
