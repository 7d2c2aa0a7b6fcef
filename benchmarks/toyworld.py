"""Style-learning benchmark on the bundled toy world: Textual Inversion against each NSYNC variant and DreamArtist.

Every run of `nsync_jax.toyworld.demo` learns one held-out style from the same images with every method, with
equal steps and images per step (DreamArtist's samples use its negative word as the negative prompt); this repeats it over held-out styles and seeds and tabulates the judge's
style accuracy (the world's stand-in for CSD), content accuracy (prompt fidelity), FID and KID (judge
features) as mean +- std over the runs.

    python benchmarks/toyworld.py --output /tmp/toyworld-bench [--styles zigzag halftone crosshatch framed]
        [--seeds 0 1 2] [--config.train.steps=400 ...]

Prints a Markdown table (for benchmarks/history/, and RESULTS.md by hand) and writes it, with every run's report,
under --output.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from nsync_jax import distributed
from nsync_jax.config import apply_override
from nsync_jax.toyworld import demo, world

COLUMNS = ("style", "content", "fid", "kid")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--styles", nargs="+", default=list(world.HELD_OUT_STYLES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    config = demo.default_config()
    config.methods = tuple(demo.RUNS)
    for override in (a for a in argv if a.startswith("--config.")):
        apply_override(config, override)
    distributed.use_cpu_devices(config.cpu_devices)  # as `nsync-jax demo` runs

    scores: dict[str, list[dict]] = {}
    for style in args.styles:
        for seed in args.seeds:
            config.style, config.seed = style, seed
            for row, s in demo.run_demo(config, args.output / f"{style}-seed{seed}", progress=False).items():
                scores.setdefault(row, []).append(s)
            print(f"done {style} seed {seed}", file=sys.stderr)

    own_settings = "; ".join(
        run + " " + ", ".join(f"{key}={value}" for key, value in demo.RUNS[run].items() if key.startswith("train."))
        for run in config.methods if any(key.startswith("train.") for key in demo.RUNS[run])) or "none"
    lines = [f"Toy-world style learning: {len(args.styles)} held-out styles ({', '.join(args.styles)}) x "
             f"{len(args.seeds)} seeds; {config.train_images} images, {config.train.steps} steps of batch "
             f"{config.train.batch_size} per method; {config.test_images} test captions. Machine: "
             f"{platform.processor() or platform.machine()}, {platform.system()}.",
             f"Runs with their own `train.*` settings in `demo.RUNS` (these replace the above): {own_settings}.", "",
             "| row | style accuracy | content accuracy | FID (judge) | KID (judge) |", "|---|---|---|---|---|"]
    for row, runs in scores.items():
        cells = []
        for column in COLUMNS:
            values = np.array([r[column] for r in runs])
            cells.append(f"{values.mean():.3f} +- {values.std():.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.md").write_text(table)
    (args.output / "scores.json").write_text(json.dumps(scores, indent=2))
    print(table)


if __name__ == "__main__":
    main()
