"""`nsync-jax convert-weights`: convert a metric network's PyTorch weights into what `evaluate` and
`evaluate-edits` read."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.errors import UserError

CONVERSIONS = ("inception-fid", "inception-torchvision", "openai-clip", "csd", "lpips-alex", "lpips-vgg", "dino-vit")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert-weights", help="convert a metric network's PyTorch weights for `evaluate`",
                              epilog="inception-fid: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; "
                                     "inception-torchvision: torchvision's inception_v3_google-0cc3c7bd.pth; "
                                     "openai-clip: OpenAI's ViT-L-14(-336px).pt; csd: the CSD checkpoint; "
                                     "lpips-alex, lpips-vgg: torchvision's alexnet-owt-7be5be79.pth or "
                                     "vgg16-397923af.pth, with lpips' weights/v0.1/alex.pth or vgg.pth as "
                                     "--lpips-heads; dino-vit: DINO's dino_vitbase8_pretrain.pth. "
                                     "These need the torch extra.")
    p.add_argument("kind", choices=CONVERSIONS)
    p.add_argument("source", type=Path, help="the PyTorch file")
    p.add_argument("destination", type=Path,
                   help="a .safetensors file (Inception, LPIPS) or a folder (CLIP, CSD, DINO)")
    p.add_argument("--lpips-heads", type=Path, default=None, help="lpips' linear heads (lpips-alex, lpips-vgg only)")
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax import convert

    is_lpips = args.kind.startswith("lpips-")
    if is_lpips != (args.lpips_heads is not None):
        raise UserError(f"--lpips-heads: {'required' if is_lpips else 'not used'} for {args.kind} "
                        "(lpips' weights/v0.1/alex.pth or vgg.pth, with lpips-alex or lpips-vgg)")
    if args.kind.startswith("inception-"):
        convert.convert_inception(args.source, args.destination, args.kind.removeprefix("inception-"))
    elif is_lpips:
        convert.convert_lpips(args.source, args.lpips_heads, args.destination, args.kind.removeprefix("lpips-"))
    elif args.kind == "openai-clip":
        convert.convert_openai_clip(args.source, args.destination)
    elif args.kind == "dino-vit":
        convert.convert_dino(args.source, args.destination)
    else:
        convert.convert_csd(args.source, args.destination)
    print(f"wrote {args.destination}")
