"""Zero-shot editing with ground truth, on the bundled toy world: SDEdit, pix2pix-zero and pix2pix-zeroCon.

Each edit swaps one attribute of a one-shape scene whose content and layout are known: its colour for another
colour, or its shape for another shape. The bundled judge reads each edited image back: the edit succeeded if
it finds the target attribute and no longer the source one; it is preserved if the other attribute (the shape
of a recoloured object, the colour of a reshaped one) and the background are still the scene's. Every pixel
the object touches, before or after the edit, dilated by `MASK_MARGIN` px, is the edited region: the mean absolute
pixel change outside it is the background change.

Each method runs through `editor.edit_images` with its defaults (the `edit` command's), all edits of a method
batched together (each image with its own caption and direction). Directions come from sentence banks of the
world's own captions (pix2pix-zero's "sentences that mention the word"): the same `BANK_SIZE` scenes, captioned
with each word in place of the edited one, so two banks differ only in that word (the `edit` command's
default, photo-caption templates, is foreign to this world's text encoder). Two reference rows need no
model: the input itself (what "no edit" scores) and a render of the edited scene (what a perfect edit scores).

    python benchmarks/bench_edit_toyworld.py --colour-edits 40 --shape-edits 20 --style flat \
        --methods zerocon pix2pix-zero sdedit --steps 50 --batch-size 20 --seed 0

With `--edit-metrics-weights DIR` (the networks of `nsync-jax evaluate-edits`), a second table gives the same
rows pix2pix-zero's metrics: CLIP accuracy and CLIP score (source and target texts: the scene's caption before
and after the edit), background LPIPS outside the edited region (the mask above) and DINO structure distance,
so they can be read next to the judge's ground truth.

Prints a Markdown table and appends it to benchmarks/history/ unless `--no-write`; per-edit records
(`edits.json`) and a contact sheet of the first edits (`grid.png`) go to `--output`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from results_file import publish  # benchmarks/ is on sys.path when run as a script
from scipy import ndimage

from nsync_jax import edit_metrics, imageio
from nsync_jax.editing import directions
from nsync_jax.editing.editor import METHODS, EditSettings, edit_images
from nsync_jax.pipeline import load_pipeline
from nsync_jax.toyworld import judge as judge_lib
from nsync_jax.toyworld import world
from nsync_jax.toyworld.demo import BUNDLED_JUDGE, contact_sheet
from nsync_jax.toyworld.pretrain import BUNDLED_MODEL

ATTRIBUTES = {"colour": "colours", "shape": "shapes"}  # edited attribute -> its Scene field
OTHER = {"colour": "shape", "shape": "colour"}  # the attribute an edit must keep
BANK_SIZE = 64  # sentences per word
MASK_MARGIN = 2  # px at 64 px: the edge's antialiasing and the VAE's blur of it count as the object's
REFERENCE_ROWS = ("input (no edit)", "edited scene rendered")
RATES = ("success", "other_kept", "background_kept", "all")
GRID_EDITS = 12


@dataclasses.dataclass(frozen=True)
class Edit:
    scene: world.Scene
    attribute: str  # "colour" or "shape"
    source: str
    target: str

    @property
    def edited_scene(self) -> world.Scene:
        return _with_word(self.scene, self.attribute, self.target)


def _with_word(scene: world.Scene, attribute: str, word: str) -> world.Scene:
    """`scene` with its one object's colour or shape replaced by `word`."""
    return dataclasses.replace(scene, **{ATTRIBUTES[attribute]: (word,)})


def sample_edits(seed: int, colour_edits: int, shape_edits: int, style: str) -> list[Edit]:
    """Colour edits first, then shape edits, each on its own one-shape scene; targets drawn uniformly among
    the other values. A pure function of the arguments."""
    scenes = world.sample_scenes(seed, colour_edits + shape_edits, styles=(style,), max_shapes=1)
    rng = np.random.default_rng([seed, 1])
    edits = []
    for i, scene in enumerate(scenes):
        attribute = "colour" if i < colour_edits else "shape"
        source = getattr(scene, ATTRIBUTES[attribute])[0]
        choices = [w for w in (world.COLOURS if attribute == "colour" else world.SHAPES) if w != source]
        edits.append(Edit(scene, attribute, source, choices[int(rng.integers(len(choices)))]))
    return edits


def write_banks(folder: Path, seed: int, style: str) -> None:
    """`folder/<word>.txt` for every colour and shape: the same scenes' captions with that word in them."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = world.sample_scenes(seed, BANK_SIZE, styles=(style,), max_shapes=1)
    for attribute, words in (("colour", world.COLOURS), ("shape", world.SHAPES)):
        for word in words:
            sentences = [world.caption(_with_word(scene, attribute, word)) for scene in scenes]
            (folder / f"{word}.txt").write_text("\n".join(sentences) + "\n")


def edit_region(edit: Edit, size: int) -> np.ndarray:
    """bool (size, size): every pixel the object touches before or after the edit (a star's thin tips too),
    dilated by `MASK_MARGIN` px at 64 px."""
    inside = (world.coverage(edit.scene, size) > 0).any(0) | (world.coverage(edit.edited_scene, size) > 0).any(0)
    margin = max(1, round(MASK_MARGIN * size / 64))
    return ndimage.binary_dilation(inside, iterations=margin)


def score(judge, edits: list[Edit], inputs: np.ndarray, outputs: np.ndarray) -> list[dict]:
    """Per edit: success, other attribute kept, background kept, all three, background change (0-255)."""
    records = []
    for edit, source_image, image, seen in zip(edits, inputs, outputs, judge_lib.predict(judge, outputs)):
        found = seen[ATTRIBUTES[edit.attribute]]
        other = OTHER[edit.attribute]
        outside = ~edit_region(edit, len(image))
        change = np.abs(image.astype(np.float32) - source_image.astype(np.float32))[outside].mean()
        record = {"success": edit.target in found and edit.source not in found,
                  "other_kept": seen[ATTRIBUTES[other]] == set(getattr(edit.scene, ATTRIBUTES[other])),
                  "background_kept": seen["background"] == edit.scene.background,
                  "background_change": float(change)}
        record["all"] = record["success"] and record["other_kept"] and record["background_kept"]
        records.append(record)
    return records


def _rate(values) -> str:
    """A fraction with its 95% Wilson interval."""
    n, p, z = len(values), float(np.mean(values)), 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.2f} [{max(centre - half, 0):.2f}, {min(centre + half, 1):.2f}]"  # rounding can step outside


def table(results: dict[str, list[dict]], edits: list[Edit], reconstruction_l1: dict[str, np.ndarray]
          ) -> list[str]:
    """Rows per edited attribute and method; `reconstruction_l1`: per method, per edit (0-255)."""
    lines = ["| method | edits | success | other attribute kept | background kept | all three | "
             "background change (0-255) | reconstruction L1 (0-255) |", "|---|---|---|---|---|---|---|---|"]
    for attribute in ATTRIBUTES:
        chosen = [i for i, e in enumerate(edits) if e.attribute == attribute]
        if not chosen:
            continue
        for row, records in results.items():
            picked = [records[i] for i in chosen]
            change = np.array([r["background_change"] for r in picked])
            cells = [_rate([r[key] for r in picked]) for key in RATES]
            l1 = f"{reconstruction_l1[row][chosen].mean():.1f}" if row in reconstruction_l1 else "-"
            lines.append(f"| {row} | {len(picked)} {attribute} | " + " | ".join(cells)
                         + f" | {change.mean():.1f} +- {change.std():.1f} | {l1} |")
    return lines


def pix2pix_zero_metrics(weights: Path, edits: list[Edit], inputs: np.ndarray, outputs: dict[str, np.ndarray],
                         batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Per row, `edit_metrics.pair_metrics` of each edit against its input: the captions before and after the
    edit as source and target texts, the edit region as the foreground background LPIPS leaves out."""
    settings = edit_metrics.EditEvaluation(weights=weights, batch_size=batch_size)
    sources = [world.caption(e.scene) for e in edits]
    targets = [world.caption(e.edited_scene) for e in edits]
    masks = [edit_region(e, inputs.shape[1]) for e in edits]
    return {row: edit_metrics.pair_metrics(settings, list(inputs), list(images), sources=sources, targets=targets,
                                           masks=masks) for row, images in outputs.items()}


def metrics_table(values: dict[str, dict[str, np.ndarray]], edits: list[Edit]) -> list[str]:
    """Rows per edited attribute and method: each metric's mean +- std over edits."""
    lines = ["| method | edits | CLIP accuracy | CLIP score | background LPIPS | structure distance |",
             "|---|---|---|---|---|---|"]
    for attribute in ATTRIBUTES:
        chosen = [i for i, e in enumerate(edits) if e.attribute == attribute]
        if not chosen:
            continue
        for row, metrics in values.items():
            cells = [f"{metrics[m][chosen].mean():.3g} +- {metrics[m][chosen].std():.2g}"
                     for m in edit_metrics.EDIT_METRICS]
            lines.append(f"| {row} | {len(chosen)} {attribute} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--colour-edits", type=int, default=40)
    parser.add_argument("--shape-edits", type=int, default=20)
    parser.add_argument("--style", default="flat", choices=world.SEEN_STYLES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=EditSettings.steps)
    parser.add_argument("--batch-size", type=int, default=20, help="images per compiled editing call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("/tmp/bench_edit_toyworld"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--edit-metrics-weights", type=Path, default=None,
                        help="the networks of `nsync-jax evaluate-edits`: add pix2pix-zero's metrics")
    args = parser.parse_args()
    started = time.perf_counter()

    pipe = load_pipeline(BUNDLED_MODEL)
    judge = judge_lib.load_judge(BUNDLED_JUDGE)
    size = json.loads((BUNDLED_MODEL / "vae" / "config.json").read_text())["sample_size"]
    edits = sample_edits(args.seed, args.colour_edits, args.shape_edits, args.style)
    banks = args.output / "banks"
    write_banks(banks, args.seed + 1, args.style)  # other scenes than the edited ones

    # --- inputs: the renders, their captions, each edit's direction ---
    inputs = world.render_batch([e.scene for e in edits], size)
    captions = [world.caption(e.scene) for e in edits]
    caption_contexts = directions.encode_prompts(pipe, captions)
    deltas = {}
    for pair in {(e.source, e.target) for e in edits}:
        deltas[pair] = directions.word_direction(pipe, *pair, banks=banks, cache_dir=banks)[0]
    edit_contexts = caption_contexts + np.stack([deltas[e.source, e.target] for e in edits])
    source_tokens = np.stack([directions.word_token_mask(pipe.tokenizer, c, [e.source])
                              for c, e in zip(captions, edits)])

    # --- each method, then the judge ---
    outputs = {REFERENCE_ROWS[0]: inputs, REFERENCE_ROWS[1]: world.render_batch([e.edited_scene for e in edits], size)}
    reconstruction_l1, seconds = {}, {}
    for method in args.methods:
        settings = EditSettings(method=method, steps=args.steps, batch_size=args.batch_size)
        start = time.perf_counter()
        result = edit_images(pipe, inputs.astype(np.float32) / 127.5 - 1, caption_contexts, edit_contexts,
                             reference_tokens=source_tokens, edit_tokens=source_tokens, settings=settings,
                             seed=args.seed, progress=False)
        seconds[method] = time.perf_counter() - start
        outputs[method] = imageio.to_uint8(result.edited)
        reconstruction = imageio.to_uint8(result.reconstruction).astype(np.float32)
        reconstruction_l1[method] = np.abs(reconstruction - inputs).mean((1, 2, 3))
        print(f"{method}: {seconds[method]:.0f} s", file=sys.stderr, flush=True)
    results = {row: score(judge, edits, inputs, images) for row, images in outputs.items()}
    metric_values = {}
    if args.edit_metrics_weights is not None:
        metric_values = pix2pix_zero_metrics(args.edit_metrics_weights, edits, inputs, outputs, args.batch_size)
        for row, metrics in metric_values.items():
            for i, record in enumerate(results[row]):
                record.update({m: v[i].item() for m, v in metrics.items()})

    # --- records, grid, report ---
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "edits.json").write_text(json.dumps(
        [{"caption": c, "attribute": e.attribute, "source": e.source, "target": e.target,
          **{row: records[i] for row, records in results.items()}} for i, (c, e) in enumerate(zip(captions, edits))],
        indent=1))
    shown = [i for attribute in ATTRIBUTES
             for i in [j for j, e in enumerate(edits) if e.attribute == attribute][:GRID_EDITS // 2]]
    imageio.write_png(args.output / "grid.png", np.asarray(contact_sheet(
        {row: images[shown] for row, images in outputs.items()}, columns=len(shown))))
    total = time.perf_counter() - started
    # Every setting the numbers depend on (not --output or --no-write), so the line reproduces the table.
    command = (f"python benchmarks/bench_edit_toyworld.py --colour-edits {args.colour_edits} --shape-edits "
               f"{args.shape_edits} --style {args.style} --methods {' '.join(args.methods)} --steps {args.steps} "
               f"--batch-size {args.batch_size} --seed {args.seed}")
    if args.edit_metrics_weights is not None:
        command += f" --edit-metrics-weights {args.edit_metrics_weights}"
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} "
               f"{jax.default_backend()}")
    report = "\n".join([
        f"\n## {datetime.date.today()} editing with ground truth on the toy world, `{command}`\n",
        f"Bundled toy-world model ({size} px), style `{args.style}`, one shape per scene; "
        f"{args.colour_edits} colour and {args.shape_edits} shape edits (seed {args.seed}); each method with the "
        f"`edit` command's defaults and {args.steps} DDIM steps, {args.batch_size} images per call; directions "
        f"from banks of {BANK_SIZE} world captions per word. Judged by the bundled judge. Rates with 95% "
        f"Wilson intervals; background change is the mean absolute pixel change outside the object (any pixel "
        f"it touches before or after the edit, dilated {MASK_MARGIN} px), mean +- std over edits; reconstruction "
        f"L1 is the unedited pass's image against the input (SDEdit: the VAE round trip). "
        f"Machine: {machine}. "
        f"Editing time per method: "
        + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()) + f"; {total:.0f} s in all.\n",
        *table(results, edits, reconstruction_l1), ""])
    if metric_values:
        report += "\n".join([
            "\npix2pix-zero's metrics (`nsync-jax evaluate-edits`' networks and definitions; texts: the caption before "
            "and after the edit; background LPIPS (AlexNet) with the edited region blacked out), mean +- std over "
            "edits:\n", *metrics_table(metric_values, edits), ""])
    publish(report, write=not args.no_write)


if __name__ == "__main__":
    main()
