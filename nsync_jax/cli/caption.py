"""`nsync-jax caption`: write a caption per image with a local image-to-text model."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.cli.common import positive_int
from nsync_jax.errors import UserError


def add_parser(subparsers) -> None:
    from nsync_jax.captions import PROMPT_PRESETS

    p = subparsers.add_parser("caption", help="caption a folder of images with a local image-to-text model",
                              description="Writes <stem>.txt per image with a transformers image-text-to-text "
                                          "model folder, on the CPU build of torch: a captioner (BLIP, BLIP-2) "
                                          "continues --prompt, a chat model (LLaVA, InternVL -hf conversions) "
                                          "answers it (default: the released NSYNC question, --prompt-preset "
                                          "nsync).")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="folder for the <stem>.txt captions")
    p.add_argument("--model", type=Path, required=True, help="the captioner's transformers model folder")
    p.add_argument("--prompt", default="", help="a captioner's start of the caption (e.g. 'a painting of'), or "
                                                "the question a chat model answers")
    p.add_argument("--prompt-preset", choices=sorted(PROMPT_PRESETS), default=None,
                   help="a known --prompt for chat models: nsync, the question the released NSYNC code asks "
                        "InternVL2-2B (the default of chat models)")
    p.add_argument("--max-words", type=positive_int, default=25)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--overwrite", action="store_true", help="recaption images that already have a caption")
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax.captions import PROMPT_PRESETS, caption_folder

    if args.prompt and args.prompt_preset:
        raise UserError("give --prompt or --prompt-preset, not both")
    prompt = PROMPT_PRESETS[args.prompt_preset] if args.prompt_preset else args.prompt
    counts = caption_folder(args.images, args.output, args.model, prompt=prompt, max_words=args.max_words,
                            overwrite=args.overwrite, batch_size=args.batch_size)
    print(f"{args.output}: wrote {counts['written']} captions, kept {counts['kept']}")
