"""`nsync-jax caption`: write a caption per image with a local image-to-text model."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.cli.common import positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("caption", help="caption a folder of images with a local image-to-text model",
                              description="Writes <stem>.txt per image with a transformers image-to-text model "
                                          "folder (BLIP, BLIP-2, LLaVA-style), on the CPU build of torch.")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="folder for the <stem>.txt captions")
    p.add_argument("--model", type=Path, required=True, help="the captioner's transformers model folder")
    p.add_argument("--prompt", default="", help="text the caption continues (e.g. 'a painting of')")
    p.add_argument("--max-words", type=positive_int, default=25)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--overwrite", action="store_true", help="recaption images that already have a caption")
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax.captions import caption_folder

    counts = caption_folder(args.images, args.output, args.model, prompt=args.prompt, max_words=args.max_words,
                            overwrite=args.overwrite, batch_size=args.batch_size)
    print(f"{args.output}: wrote {counts['written']} captions, kept {counts['kept']}")
