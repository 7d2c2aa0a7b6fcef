"""A training run's outputs besides checkpoints: metrics.jsonl, TensorBoard scalars and sample grids."""
from __future__ import annotations

import json
import struct

import numpy as np
from PIL import Image

from conftest import tiny_config
from nsync_jax.train import outputs, trainer


def read_scalars(folder) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files in `folder`: {tag: {step: value}} (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tile_lays_images_out_row_by_row():
    images = np.arange(5)[:, None, None, None] * np.ones((5, 2, 3, 1))
    grid = outputs.tile(images, columns=3)
    assert grid.shape == (4, 9, 1)
    np.testing.assert_array_equal(grid[0, ::3, 0], [0, 1, 2])
    np.testing.assert_array_equal(grid[2, ::3, 0], [3, 4, 1])  # the blank is white (1)


def test_training_writes_tensorboard_scalars_and_sample_grids(sd1_dir, style_dir, tmp_path):  # noqa: F811
    config = tiny_config(sd1_dir, style_dir, train__steps=4, train__sample_every_steps=2, sample__steps=2,
                         sample__count=3)
    trainer.train(config, tmp_path, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert scalars["train/loss"] == {m["step"]: np.float32(m["loss"]) for m in logged}
    assert set(scalars) >= {"train/loss", "train/grad_norm", "train/steps_per_sec"}
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step_000002.png", "step_000004.png"]
    first, last = (np.asarray(Image.open(tmp_path / "samples" / g), np.int16) for g in grids)
    assert first.shape == (32, 3 * 32, 3)
    # Same prompts and noise: the grids differ only because the token's rows changed in between.
    assert 0 < np.abs(first - last).mean()
