"""`nsync-jax convert-weights`: convert a metric network's PyTorch weights into what `evaluate` reads."""
from __future__ import annotations

from pathlib import Path

CONVERSIONS = ("inception-fid", "inception-torchvision", "openai-clip", "csd")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert-weights", help="convert a metric network's PyTorch weights for `evaluate`",
                              epilog="inception-fid: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; "
                                     "inception-torchvision: torchvision's inception_v3_google-0cc3c7bd.pth; "
                                     "openai-clip: OpenAI's ViT-L-14(-336px).pt; csd: the CSD checkpoint. "
                                     "These need the torch extra.")
    p.add_argument("kind", choices=CONVERSIONS)
    p.add_argument("source", type=Path, help="the PyTorch file")
    p.add_argument("destination", type=Path, help="a .safetensors file (Inception) or a folder (CLIP, CSD)")
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax import convert

    if args.kind.startswith("inception-"):
        convert.convert_inception(args.source, args.destination, args.kind.removeprefix("inception-"))
    elif args.kind == "openai-clip":
        convert.convert_openai_clip(args.source, args.destination)
    else:
        convert.convert_csd(args.source, args.destination)
    print(f"wrote {args.destination}")
