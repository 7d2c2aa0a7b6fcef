"""`nsync-jax evaluate-edits`: pix2pix-zero's editing metrics (CLIP accuracy and score, background LPIPS,
DINO structure distance) of edits against their originals."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.cli.common import positive_int


def add_parser(subparsers) -> None:
    from nsync_jax.edit_metrics import EDIT_METRICS, LPIPS_NETS

    p = subparsers.add_parser("evaluate-edits", help="CLIP accuracy and score, background LPIPS and DINO structure "
                                                     "distance of edited images against their originals",
                              epilog="Pairs are matched by file stem. Networks missing from --weights come from their standard "
                                     "releases, fetched into the Hugging Face cache and converted on first use "
                                     "(as for `evaluate`); `nsync-jax convert-weights` converts the files you "
                                     "have into --weights (lpips-alex, dino-vit).")
    p.add_argument("--originals", type=Path, required=True, help="folder of the images before editing")
    p.add_argument("--edits", type=Path, required=True, help="folder of the edited images, named as their originals")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--source", help="the source text of every edit (e.g. 'a photo of a cat')")
    source.add_argument("--source-prompts", type=Path, help="folder of <stem>.txt source texts, one per edit")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", help="the target text of every edit (e.g. 'a photo of a dog')")
    target.add_argument("--target-prompts", type=Path, help="folder of <stem>.txt target texts, one per edit")
    p.add_argument("--masks", type=Path, default=None,
                   help="folder of foreground masks <stem>.png (white = edited object) for background LPIPS; "
                        "without it LPIPS covers the whole image")
    p.add_argument("--metrics", default=",".join(EDIT_METRICS), help=f"comma-separated, from {','.join(EDIT_METRICS)}")
    p.add_argument("--lpips-net", choices=LPIPS_NETS, default="alex")
    p.add_argument("--weights", type=Path, default=None,
                   help="folder of converted metric networks (default: the cache of standard releases)")
    p.add_argument("--output", type=Path, required=True, help="JSON file to write")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax import edit_metrics
    from nsync_jax.files import write_json

    settings = edit_metrics.EditEvaluation(weights=args.weights, lpips_net=args.lpips_net, batch_size=args.batch_size,
                                           metrics=tuple(m for m in args.metrics.split(",") if m))
    result = edit_metrics.evaluate_edits(settings, args.originals, args.edits,
                                         source=args.source_prompts or args.source,
                                         target=args.target_prompts or args.target, masks_dir=args.masks)
    write_json(args.output, result)
    print(edit_metrics.table(result))
    print(f"wrote {args.output}")
