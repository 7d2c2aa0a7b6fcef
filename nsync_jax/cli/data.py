"""`nsync-jax data prepare`: check a style dataset and write it as array_record for training."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
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
    prepare.set_defaults(run=run_prepare)


def run_prepare(args) -> None:
    from nsync_jax.data import tfds_style

    counts = tfds_style.prepare(args.output, args.source, captions=args.captions, negatives=args.negatives,
                                skip_bad_items=args.skip_bad_items)
    print(f"wrote {args.output}: " + ", ".join(f"{split} {n} examples" for split, n in counts.items()))
