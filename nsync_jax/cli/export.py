"""`nsync-jax export`: write what a training run learned in the formats other tools read."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    from nsync_jax.export import FORMATS, MODEL_FORMATS

    p = subparsers.add_parser("export", help="write a checkpoint's learned embeddings for diffusers or A1111, "
                                             "its LoRA for diffusers, A1111 or ComfyUI, or its fine-tuned model "
                                             "as a diffusers folder",
                              epilog="DreamArtist runs also write the negative word next to --output, as "
                                     "NAME-neg.EXT (token <token>-neg). LoRA runs: --format diffusers-lora (a "
                                     ".safetensors for load_lora_weights), a1111-lora (kohya-ss's layout, for "
                                     "A1111, ComfyUI and load_lora_weights; sample --lora reads both) or "
                                     "diffusers-pipeline; full runs: --format diffusers-pipeline (a new model "
                                     "folder).")
    p.add_argument("--workdir", type=Path, required=True, help="the training run's --workdir")
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--output", type=Path, required=True, help="the file (or, diffusers-pipeline, folder) to write")
    p.add_argument("--format", choices=FORMATS + MODEL_FORMATS, default="diffusers")
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax.train.trainer import export_run

    print(export_run(args.workdir, args.output, args.format, args.step))
