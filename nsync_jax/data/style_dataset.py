"""Style datasets in NSYNC's layout: positive images, captions as `<stem>.txt`, negatives with the same stems.

    images/    monet_001.jpg  monet_002.png ...      the style to learn (positives)
    captions/  monet_001.txt  monet_002.txt ...      one caption per positive
    negatives/ monet_001.png  monet_002.png ...      the same caption drawn by the frozen model in a generic style

`load_style_dataset` checks the whole folder before anything else happens and reports every problem at once
(missing, empty or undecodable caption, missing negative, unreadable image), so that a long run never dies at
step 5000 on one bad file; folders and captions are read by `imageio`'s rules, as every command reads them.
Images are resized to a square of `resolution` by squashing (as the released NSYNC code does), by a centre
crop, or by a random crop of the short-side resize (as DreamBooth / StyleForge scripts do: drawn once, seeded
per image), and returned as float32 NHWC in [-1, 1]. Where each square came from (`crop_record`: the image's size
and the square's top-left in the short-side resize, for it and its mirror image) is kept with it: SDXL's
micro-conditioning reads it.
"""
from __future__ import annotations

import dataclasses
import io
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nsync_jax.errors import UserError
from nsync_jax.imageio import caption_path, image_files, read_caption

RESIZE_MODES = ("squash", "center_crop", "random_crop")
MASK_SUFFIX = "_att"


@dataclasses.dataclass(frozen=True)
class StyleDataset:
    stems: tuple[str, ...]
    positives: np.ndarray  # (N, resolution, resolution, 3) float32 in [-1, 1]
    negatives: np.ndarray | None  # same shape, or None for Textual Inversion without negatives
    captions: tuple[str, ...]
    masks: np.ndarray | None = None  # (N, resolution, resolution) grey levels of DreamArtist's attention masks
    # (N, 2, 4) `crop_record` of each positive and its mirror image; None: the images are given squares (the
    # record of every one is (resolution, resolution, 0, 0)).
    crops: np.ndarray | None = None
    negative_crops: np.ndarray | None = None  # the same for the negatives


def images_by_stem(folder: Path, what: str) -> dict[str, Path]:
    """`imageio.image_files(folder)` by stem; of two files with one stem, the first by name."""
    found = {}
    for path in image_files(folder, what):
        found.setdefault(path.stem, path)
    return found


@dataclasses.dataclass(frozen=True)
class StyleItem:
    """One validated training example: the encoded image files (as stored), and the caption."""

    stem: str
    image: bytes
    caption: str
    negative: bytes | None
    mask: bytes | None = None  # DreamArtist's per-image loss weights (`<stem>_att.<ext>`, grey)


def square_crop(width: int, height: int, resolution: int, resize: str, crop_seed=None
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where the training square of a `width` x `height` image lies: the size (width, height) of the image resized
    so that its short side is `resolution` (squash: the square itself), and the square's (left, top) in it.
    "random_crop" draws the offset from `crop_seed`; "center_crop" cuts the short side's square from the middle."""
    if resize == "squash":
        return (resolution, resolution), (0, 0)
    scale = resolution / min(width, height)
    scaled = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if resize == "center_crop":  # the offset of the square `decode_image` cuts before resizing, scaled
        side = min(width, height)
        return scaled, (round((width - side) // 2 * scale), round((height - side) // 2 * scale))
    rng = np.random.default_rng(crop_seed)
    left = int(rng.integers(0, scaled[0] - resolution + 1))
    return scaled, (left, int(rng.integers(0, scaled[1] - resolution + 1)))


def crop_record(data: bytes, resolution: int, resize: str, crop_seed=None) -> np.ndarray:
    """`(2, 4)` float32: original (height, width) and crop (top, left) of an image's training square (row 0) and of
    its mirror image (row 1), as diffusers' SDXL training scripts record them for SDXL's micro-conditioning (the
    size before resizing; the crop in the short-side resize, measured in the mirrored image for the mirror, as
    their flip comes before the crop). A squashed image is recorded as a square of `resolution` cropped at
    (0, 0), as the released SDXL NSYNC script conditions it."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    (scaled_width, _), (left, top) = square_crop(width, height, resolution, resize, crop_seed)
    original = (resolution, resolution) if resize == "squash" else (height, width)
    return np.asarray([[*original, top, left], [*original, top, scaled_width - resolution - left]], np.float32)


def decode_image(data: bytes, resolution: int, resize: str, mode: str = "RGB", crop_seed=None) -> np.ndarray:
    """Encoded image bytes as float32 RGB `(resolution, resolution, 3)` in [-1, 1]; `mode="L"`: grey levels
    `(resolution, resolution)` in [0, 255]. `resize`: "squash" or "center_crop" to a square, then bicubic (as
    the released NSYNC code); "random_crop": the short side to `resolution` (bilinear, as torchvision's Resize
    in DreamBooth scripts), then a square at a random offset drawn from `crop_seed` (`square_crop`)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert(mode)
        if resize == "random_crop":
            scaled, (left, top) = square_crop(image.width, image.height, resolution, resize, crop_seed)
            image = image.resize(scaled, Image.Resampling.BILINEAR)
            image = image.crop((left, top, left + resolution, top + resolution))
        else:
            if resize == "center_crop":
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side))
            image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        if mode == "L":
            return np.asarray(image, np.float32)
        return np.asarray(image, np.float32) / 127.5 - 1.0


def mask_weights(grey: np.ndarray, size: int) -> np.ndarray:
    """DreamArtist's loss weights from attention masks `(N, H, W)` (grey levels) at latent size `(N, size, size)`
    (bicubic): grey g maps to g / 127 up to 127 (0 to 1), then 1 + 4 (g - 127) / 128 (up to 5), as released."""
    g = np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))
                  for m in grey]).clip(0, 255)
    return np.where(g <= 127, g / 127, 1 + 4 * (g - 127) / 128).astype(np.float32)


def _read_valid_image(path: Path, problems: list[str]) -> bytes | None:
    """The file's bytes if they decode as an image; otherwise the problem is recorded."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return data
    except (OSError, UnidentifiedImageError, ValueError) as e:
        problems.append(f"unreadable image {path} ({type(e).__name__})")
        return None


def find_style_items(images: Path, *, captions: Path | None, negatives: Path | None,
                     skip_bad_items: bool = False, masks: bool = False) -> list[StyleItem]:
    """Validates a style dataset in NSYNC's layout and reads its files; see the module docstring.

    Raises `UserError` listing every missing, empty or undecodable caption (the latter two in
    `imageio.read_caption`'s words), missing negative and unreadable image, unless
    `skip_bad_items`, which drops those items with a warning instead. With `masks`, an image `<stem>_att.<ext>`
    next to `<stem>.<ext>` is that image's attention mask (DreamArtist's), not a training image.
    """
    images, captions = Path(images), captions and Path(captions)
    positives = images_by_stem(images, "images")
    mask_files = {}
    if masks:
        mask_files = {stem[:-len(MASK_SUFFIX)]: path for stem, path in positives.items()
                      if stem.endswith(MASK_SUFFIX) and stem[:-len(MASK_SUFFIX)] in positives}
        positives = {stem: path for stem, path in positives.items()
                     if not (stem.endswith(MASK_SUFFIX) and stem[:-len(MASK_SUFFIX)] in mask_files)}
    negative_files = images_by_stem(Path(negatives), "negatives") if negatives else {}
    if captions is not None and not captions.is_dir():
        raise UserError(f"{captions}: captions folder not found")

    problems: dict[str, list[str]] = {}
    kept = []
    for stem, path in positives.items():
        item_problems: list[str] = []
        caption = ""
        if captions is not None:
            caption_file = caption_path(captions, stem)
            if not caption_file.is_file():
                item_problems.append(f"missing caption {caption_file}")
            else:
                try:
                    caption = read_caption(caption_file)
                except UserError as e:  # empty or undecodable: the message `read_caption` gives everywhere
                    item_problems.append(str(e))
        negative = None
        if negatives:
            if stem in negative_files:
                negative = _read_valid_image(negative_files[stem], item_problems)
            else:
                item_problems.append(f"missing negative {Path(negatives) / (stem + '.png')}")
        positive = _read_valid_image(path, item_problems)
        mask = _read_valid_image(mask_files[stem], item_problems) if stem in mask_files else None
        if item_problems:
            problems[stem] = item_problems
        else:
            kept.append(StyleItem(stem, positive, caption, negative, mask))

    if problems:
        listing = "; ".join(p for item in problems.values() for p in item)
        if not skip_bad_items:
            raise UserError(f"{images}: {sum(map(len, problems.values()))} problem(s) in the dataset: {listing}")
        warnings.warn(f"skipping {len(problems)} bad item(s): {listing}", stacklevel=2)
    if not kept:
        raise UserError(f"{images}: no usable items left")
    return kept


def build_style_dataset(items: list[StyleItem], resolution: int, resize: str = "squash",
                        seed: int = 0) -> StyleDataset:
    """Decodes and resizes validated items (from folders or a prepared tfds dataset) into arrays. A random crop
    depends on `seed` and the item's stem only, and is the same for the image, its negative and its mask."""
    if resize not in RESIZE_MODES:
        raise UserError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
    with_negatives = items[0].negative is not None

    def seed_of(item):
        return [seed, zlib.crc32(item.stem.encode())]

    def decode(item, data, mode="RGB"):
        return decode_image(data, resolution, resize, mode, crop_seed=seed_of(item))

    def crops(field):
        return np.stack([crop_record(getattr(item, field), resolution, resize, seed_of(item)) for item in items])

    return StyleDataset(
        stems=tuple(item.stem for item in items),
        positives=np.stack([decode(item, item.image) for item in items]),
        negatives=np.stack([decode(item, item.negative) for item in items]) if with_negatives else None,
        captions=tuple(item.caption for item in items),
        # An image without a mask weighs every pixel 1 (grey 127).
        masks=np.stack([decode(item, item.mask, mode="L") if item.mask is not None
                        else np.full((resolution, resolution), 127, np.float32) for item in items])
        if any(item.mask is not None for item in items) else None,
        crops=crops("image"), negative_crops=crops("negative") if with_negatives else None)


def load_style_dataset(images: Path, *, captions: Path | None, negatives: Path | None, resolution: int,
                       resize: str = "squash", skip_bad_items: bool = False, seed: int = 0) -> StyleDataset:
    """`find_style_items`, then `build_style_dataset`."""
    if resize not in RESIZE_MODES:
        raise UserError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
    items = find_style_items(images, captions=captions, negatives=negatives, skip_bad_items=skip_bad_items)
    return build_style_dataset(items, resolution, resize, seed)
