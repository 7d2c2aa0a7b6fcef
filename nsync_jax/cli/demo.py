"""`nsync-jax demo`: the bundled end-to-end job on the toy world, with its report."""
from __future__ import annotations

from pathlib import Path

from nsync_jax.cli.common import config_with_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the bundled end-to-end job: learn a toy-world style the bundled model has never seen with "
                     "Textual Inversion, NSYNC and NSYNC-LoRA, and judge the results (about 5 minutes on a CPU)",
        epilog="Override any setting with --config.KEY=VALUE, e.g. --config.style=zigzag --config.train.steps=200")
    p.add_argument("--output", type=Path, required=True, help="folder for every artefact (report.md, grid.png, ...)")
    p.set_defaults(run=run)


def run(args) -> None:
    from nsync_jax import distributed
    from nsync_jax.toyworld import demo

    config = config_with_overrides(demo.default_config, args.config_overrides)
    distributed.use_cpu_devices(config.cpu_devices)
    scores = demo.run_demo(config, args.output)
    best = max((m for m in config.methods), key=lambda m: scores[m]["style"])
    print(f"wrote {args.output / 'report.md'} and {args.output / 'grid.png'}; best held-out style accuracy: "
          f"{best} {scores[best]['style']:.2f} (content {scores[best]['content']:.2f})")
