"""Image files: PNGs written atomically (temporary name, then rename), so a kill never leaves half a file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nsync_jax.files import atomic_write


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounding as diffusers' `numpy_to_pil` does."""
    return (np.asarray(image, np.float32) * 255).round().astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    """Writes an `(height, width, 3)` image in [0, 1] (or uint8) to `path` atomically."""
    path = Path(path)
    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
