"""Style datasets in NSYNC's layout: positive images, captions as `<stem>.txt`, negatives with the same stems.

    images/    monet_001.jpg  monet_002.png ...      the style to learn (positives)
    captions/  monet_001.txt  monet_002.txt ...      one caption per positive
    negatives/ monet_001.png  monet_002.png ...      the same caption drawn by the frozen model in a generic style

`load_style_dataset` checks the whole folder before anything else happens and reports every problem at once
(missing caption, missing negative, unreadable image), so that a long run never dies at step 5000 on one bad
file. Images are resized to a square of `resolution` either by squashing (as the released NSYNC code does)
or by a centre crop, and returned as float32 NHWC in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nsync_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESIZE_MODES = ("squash", "center_crop")


@dataclasses.dataclass(frozen=True)
class StyleDataset:
    stems: tuple[str, ...]
    positives: np.ndarray  # (N, resolution, resolution, 3) float32 in [-1, 1]
    negatives: np.ndarray | None  # same shape, or None for Textual Inversion without negatives
    captions: tuple[str, ...]


def images_by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: {what} folder not found")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.stem, path)
    return found


def load_image(path: Path, resolution: int, resize: str) -> np.ndarray:
    """An RGB image as float32 `(resolution, resolution, 3)` in [-1, 1] (bicubic, as the released code)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if resize == "center_crop":
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        return np.asarray(image, np.float32) / 127.5 - 1.0


def _try_load(path: Path, resolution: int, resize: str, problems: list[str]) -> np.ndarray | None:
    try:
        return load_image(path, resolution, resize)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        problems.append(f"unreadable image {path} ({type(e).__name__})")
        return None


def load_style_dataset(images: Path, *, captions: Path | None, negatives: Path | None, resolution: int,
                       resize: str = "squash", skip_bad_items: bool = False) -> StyleDataset:
    """Validates and loads a style dataset; see the module docstring for the layout.

    Raises `UserError` listing every missing caption, missing negative and unreadable image, unless
    `skip_bad_items`, which drops those items with a warning instead.
    """
    if resize not in RESIZE_MODES:
        raise UserError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
    images, captions = Path(images), captions and Path(captions)
    positives = images_by_stem(images, "images")
    negative_files = images_by_stem(Path(negatives), "negatives") if negatives else {}
    if captions is not None and not captions.is_dir():
        raise UserError(f"{captions}: captions folder not found")
    if not positives:
        raise UserError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")

    problems: dict[str, list[str]] = {}
    kept = []
    for stem, path in positives.items():
        item_problems: list[str] = []
        caption = ""
        if captions is not None:
            caption_file = captions / f"{stem}.txt"
            if caption_file.is_file():
                caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
            else:
                item_problems.append(f"missing caption {caption_file}")
        negative = None
        if negatives:
            if stem in negative_files:
                negative = _try_load(negative_files[stem], resolution, resize, item_problems)
            else:
                item_problems.append(f"missing negative {Path(negatives) / (stem + '.png')}")
        positive = _try_load(path, resolution, resize, item_problems)
        if item_problems:
            problems[stem] = item_problems
        else:
            kept.append((stem, positive, negative, caption))

    if problems:
        listing = "; ".join(p for item in problems.values() for p in item)
        if not skip_bad_items:
            raise UserError(f"{images}: {sum(map(len, problems.values()))} problem(s) in the dataset: {listing}")
        warnings.warn(f"skipping {len(problems)} bad item(s): {listing}", stacklevel=2)
    if not kept:
        raise UserError(f"{images}: no usable items left")
    stems, pos, neg, caps = zip(*kept)
    return StyleDataset(stems=stems, positives=np.stack(pos), negatives=np.stack(neg) if negatives else None,
                        captions=caps)
