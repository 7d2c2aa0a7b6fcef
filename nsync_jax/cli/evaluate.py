"""`nsync-jax evaluate`: score generated images against real ones (FID, KID, CMMD, CSD, CLIP score)."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.cli.common import positive_int


def add_parser(subparsers) -> None:
    from nsync_jax.evaluate import METRICS, PROTOCOLS

    p = subparsers.add_parser("evaluate", help="FID, KID, CMMD, CSD and CLIP score of generated against real images",
                              epilog="Networks missing from --weights (or every network, without it) come from their standard "
                                     "releases, fetched into the Hugging Face cache and converted on first use; "
                                     "offline (HF_HUB_OFFLINE=1) only the cache is read. `nsync-jax "
                                     "convert-weights` converts the files you have into --weights.")
    p.add_argument("--real", type=Path, required=True, help="folder of real (reference style) images")
    p.add_argument("--generated", type=Path, required=True, help="folder of generated images")
    p.add_argument("--captions", type=Path, default=None, help="<stem>.txt per generated image (clip metric); with --protocol styleforge "
                        "also a prompt list (line i: the images img_<i>_<k>), and <stem>.txt covers <stem>_<k>")
    p.add_argument("--metrics", default="fid,kid,cmmd,csd", help=f"comma-separated, from {','.join(METRICS)}")
    p.add_argument("--weights", type=Path, default=None,
                   help="folder of converted metric networks (default: the cache of standard releases)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                   help="standard tools' choices, or the NSYNC paper's or StyleForge's scripts'")
    p.add_argument("--output", type=Path, required=True, help="JSON file to write")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--seed", type=int, default=0, help="KID subsets and the FID bootstrap")
    p.add_argument("--kid-subset-size", type=positive_int, default=1000)
    p.add_argument("--kid-subsets", type=positive_int, default=100)
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax import evaluate
    from nsync_jax.files import write_json

    settings = evaluate.Evaluation(protocol=args.protocol, metrics=tuple(m for m in args.metrics.split(",") if m),
                                   weights=args.weights, batch_size=args.batch_size, seed=args.seed,
                                   kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets)
    result = evaluate.evaluate(settings, args.real, args.generated, args.captions)
    write_json(args.output, result)
    print(evaluate.table(result))
    print(f"wrote {args.output}")
