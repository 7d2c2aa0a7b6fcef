"""`nsync-jax edit`: zero-shot image editing (pix2pix-zeroCon, pix2pix-zero, SDEdit)."""
from __future__ import annotations

import argparse
from pathlib import Path

from nsync_jax.cli.common import DTYPES, add_model_flags, positive_int


def add_parser(subparsers) -> None:
    from nsync_jax.editing.editor import DEFAULT_CUT_WEIGHT, METHODS, REFERENCE_STORAGE

    p = subparsers.add_parser(
        "edit", help="zero-shot image editing: pix2pix-zeroCon, pix2pix-zero or SDEdit",
        description="Edits images from --source to --target (pix2pix-zero's sentence-bank direction) or towards "
                    "--target-prompt, and writes edited.png, reconstruction.png, attention.png (the edited word's "
                    "cross-attention over the reconstruction and the edit) and edit.json into --output (one "
                    "folder per image when there are several).")
    add_model_flags(p)
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
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps of the inversion and the edit")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale, the caption as negative prompt")
    p.add_argument("--inversion-regularization", action=argparse.BooleanOptionalAction, default=True,
                   help="pix2pix-zero's auto-correlation and KL regularisation of the inverted noise")
    p.add_argument("--strength", type=float, default=0.5, help="SDEdit: how far the image is noised (0-1]")
    p.add_argument("--reference", choices=REFERENCE_STORAGE, default="recompute",
                   help="recompute the reference pass next to the edit (least memory) or keep its attention on "
                        "the host in bfloat16 (one UNet call fewer per step)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="resize every image to N x N (Lanczos) first")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="images per compiled call (each needs about 10 GB more at 512 px in float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--output", type=Path, required=True)
    p.set_defaults(run=run)


def run(args) -> None:
    import jax.numpy as jnp

    from nsync_jax.editing.editor import EditSettings, edit_files, read_images
    from nsync_jax.editing.inversion import NoiseRegularization
    from nsync_jax.pipeline import load_pipeline

    inputs = read_images(args.image, args.resolution)
    settings = EditSettings(
        method=args.method, steps=args.steps, guidance=args.guidance, xa_guidance=args.xa_guidance,
        cut_weight=args.cut_weight, regularization=NoiseRegularization() if args.inversion_regularization else None,
        strength=args.strength, reference=args.reference, batch_size=args.batch_size).checked()
    pipe = load_pipeline(args.model, dtype=jnp.dtype(args.dtype), revision=args.revision, variant=args.variant,
                         model_config=args.model_config)
    folders = edit_files(pipe, inputs, args.output, source=args.source, target=args.target,
                         target_prompt=args.target_prompt, captions=args.caption, captioner=args.captioner,
                         banks=args.directions, settings=settings, seed=args.seed)
    print(f"wrote {', '.join(str(f / 'edited.png') for f in folders)}")
