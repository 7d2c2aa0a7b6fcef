"""`nsync-jax convert-weights`: convert a metric network's PyTorch weights into what `evaluate` and
`evaluate-edits` read, or (`fetch NAME`) fetch and convert its standard release into the cache they read when
`--weights` lacks it."""
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
                                     "These need the torch extra. `fetch NAME` (a network: inception-fid, "
                                     "inception-torchvision, clip, clip-336, clip-b16, csd, dino, lpips-alex, "
                                     "lpips-vgg; or all) fetches its standard release into the Hugging Face cache "
                                     "and converts it once, for a later offline run.")
    p.add_argument("kind", choices=(*CONVERSIONS, "fetch"))
    p.add_argument("source", help="the PyTorch file (with fetch: the network's name, or all)")
    p.add_argument("destination", type=Path, nargs="?",
                   help="a .safetensors file (Inception, LPIPS) or a folder (CLIP, CSD, DINO); none with fetch")
    p.add_argument("--lpips-heads", type=Path, default=None, help="lpips' linear heads (lpips-alex, lpips-vgg only)")
    p.set_defaults(run=run)


def run(args) -> None:
    if args.kind == "fetch":
        return fetch(args)
    from nsync_jax import convert

    if args.destination is None:
        raise UserError(f"convert-weights {args.kind}: the destination is required")
    source = Path(args.source)
    is_lpips = args.kind.startswith("lpips-")
    if is_lpips != (args.lpips_heads is not None):
        raise UserError(f"--lpips-heads: {'required' if is_lpips else 'not used'} for {args.kind} "
                        "(lpips' weights/v0.1/alex.pth or vgg.pth, with lpips-alex or lpips-vgg)")
    if args.kind.startswith("inception-"):
        convert.convert_inception(source, args.destination, args.kind.removeprefix("inception-"))
    elif is_lpips:
        convert.convert_lpips(source, args.lpips_heads, args.destination, args.kind.removeprefix("lpips-"))
    elif args.kind == "openai-clip":
        convert.convert_openai_clip(source, args.destination)
    elif args.kind == "dino-vit":
        convert.convert_dino(source, args.destination)
    else:
        convert.convert_csd(source, args.destination)
    print(f"wrote {args.destination}")


def fetch(args) -> None:
    from nsync_jax.metric_networks import NETWORKS, network_path

    name = args.source
    if args.destination is not None or args.lpips_heads is not None:
        raise UserError(f"convert-weights fetch: {args.destination or '--lpips-heads'} not used; the network goes "
                        "into the Hugging Face cache, where `evaluate` and `evaluate-edits` find it")
    if name != "all" and name not in NETWORKS:
        raise UserError(f"convert-weights fetch {name}: not a network (one of {', '.join(NETWORKS)}, or all)")
    for each in NETWORKS if name == "all" else [name]:
        print(f"{each}: {network_path(None, each)}")
