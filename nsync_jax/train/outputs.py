"""What a training run writes besides checkpoints: the metrics log (`metrics.jsonl` and TensorBoard scalars)
and sample grids of the token being learned.

Only process 0 writes; every process takes part in drawing a grid (sampling is a collective over the mesh).
TensorBoard event files come from tensorboardX (no TensorFlow): `tensorboard --logdir WORKDIR/tensorboard`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from nsync_jax import imageio
from nsync_jax.sampling import SampleSettings, generate


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` and the same scalars to TensorBoard."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = (Path(workdir) / "metrics.jsonl").open("a")
            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(metrics) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            if name != "step":
                self._tensorboard.add_scalar(f"train/{name}", value, metrics["step"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """`(n, h, w, 3)` images as one `(rows * h, columns * w, 3)` picture, row by row, blanks at the end."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.ones((rows * columns, h, w, c), images.dtype)
    grid[:n] = images
    return grid.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def write_sample_grid(path: Path | None, pipe, prompts: Sequence[str], settings: SampleSettings, seed: int,
                      negative_prompt: str = "", base=None) -> np.ndarray:
    """Draws one image per prompt with the pipeline as it is (learned rows included) and writes them as one
    row of a grid to `path` (None: draw only, for the processes that do not write). Same seed every time, so
    grids of successive steps differ only by what the token learned. `base`: the model of a handoff
    (`settings.handoff_timestep`)."""
    images = generate(pipe, list(prompts), negative_prompt=negative_prompt, seed=seed, settings=settings,
                      progress=False, base=base)
    grid = tile(images, columns=len(prompts))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        imageio.write_png(path, grid)
    return grid
