"""Image and caption files, with one set of rules for every command that reads them.

Reading (the dataset, `caption`, `negatives`, `evaluate` and `edit` all go through these):

* `image_files(folder)`: the image files of a folder (`IMAGE_SUFFIXES`, any case), sorted by name; a missing
  folder or one without images is a one-line `UserError` naming it. Other files are left out; what an image
  means (a training image, DreamArtist's `<stem>_att.<ext>` mask, a second file of one stem) is the caller's
  business.
* `read_caption(path)`: a caption file `<stem>.txt` as one line of UTF-8 text (runs of whitespace, newlines
  included, become one space; the CLIP tokenizer reads them so anyway). An empty or whitespace-only caption,
  or a file that does not read or decode, is a `UserError` naming the file, the same message everywhere.
  `caption_text(text, source)` applies the same rule to a caption given another way (a flag).
* `read_captions(folder, stems=None)`: `{stem: caption}` of every `*.txt` of a folder, or of the given stems.
* `read_prompt_list(path)`: a text file of prompts, one per line, as `{"img_<i>": prompt}` with i the line's
  0-based number (the released `gen_imgs_random_prompts.py` names its images so); blank lines are skipped.

Writing: PNGs written atomically (temporary name, then rename), so a kill never leaves half a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from nsync_jax.errors import UserError
from nsync_jax.files import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"


# ------------------------------------------------------------------------------------------------------------
# Reading image folders and captions.
# ------------------------------------------------------------------------------------------------------------

def image_files(folder: Path, what: str = "images") -> list[Path]:
    """The image files of `folder`, sorted by name; `UserError` "FOLDER: <what> folder not found" or
    "FOLDER: no images (.png, ...)"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {what} folder not found")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def caption_path(folder: Path, stem: str) -> Path:
    """Where the caption of image `stem` is: `folder/<stem>.txt`."""
    return Path(folder) / f"{stem}{CAPTION_SUFFIX}"


def caption_text(text: str, source: Path | str) -> str:
    """`text` on one line (whitespace runs -> one space); empty: `UserError` "SOURCE: the caption is empty"."""
    caption = " ".join(text.split())
    if not caption:
        raise UserError(f"{source}: the caption is empty")
    return caption


def read_caption(path: Path) -> str:
    """The caption in the file `path` (UTF-8, by `caption_text`'s rule); `UserError` naming the file when it is
    empty or does not read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the caption ({type(e).__name__}: {e})") from None
    return caption_text(text, path)


def read_captions(folder: Path, stems: Iterable[str] | None = None) -> dict[str, str]:
    """`{stem: caption}` of every `*.txt` in `folder` (sorted by file name), or of each of `stems` (in their order),
    each by `read_caption`; a missing folder, a folder without captions or a missing caption of `stems` is a
    `UserError` naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: captions folder not found")
    if stems is None:
        paths = sorted(folder.glob(f"*{CAPTION_SUFFIX}"))
        if not paths:
            raise UserError(f"{folder}: no caption files (*{CAPTION_SUFFIX})")
        return {path.stem: read_caption(path) for path in paths}
    stems = list(dict.fromkeys(stems))
    missing = [stem for stem in stems if not caption_path(folder, stem).is_file()]
    if missing:
        raise UserError(f"{caption_path(folder, missing[0])}: no caption for image {missing[0]!r} "
                        f"({len(missing)} missing)")
    return {stem: read_caption(caption_path(folder, stem)) for stem in stems}


def read_prompt_list(path: Path) -> dict[str, str]:
    """`{"img_<i>": prompt}` of the non-blank lines of `path` (i: the line's number from 0), each on one line by
    `caption_text`'s rule; a file that does not read or holds no prompt is a `UserError` naming it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the prompt list ({type(e).__name__}: {e})") from None
    prompts = {f"img_{i}": " ".join(line.split()) for i, line in enumerate(lines) if line.strip()}
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line)")
    return prompts


# ------------------------------------------------------------------------------------------------------------
# Writing images.
# ------------------------------------------------------------------------------------------------------------

def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounding as diffusers' `numpy_to_pil` does."""
    return (np.asarray(image, np.float32) * 255).round().astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    """Writes an `(height, width, 3)` image in [0, 1] (or uint8) to `path` atomically."""
    path = Path(path)
    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
