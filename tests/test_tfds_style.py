"""Style datasets through the tensorflow-datasets builder (array_record, no TensorFlow): NSYNC's and CycleGAN's
layouts, validation before writing, and training from a prepared dataset like from its folders."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from nsync_jax.cli import main
from nsync_jax.data import tfds_style
from nsync_jax.data.style_dataset import build_style_dataset, find_style_items
from nsync_jax.errors import UserError
from conftest import tiny_config, write_style_dataset


def test_no_tensorflow_needed():
    assert importlib.util.find_spec("tensorflow") is None


def test_prepared_dataset_reads_back_the_same_items(tmp_path):
    root = write_style_dataset(tmp_path / "style")
    # A JPEG among the PNGs: stored as the same bytes, not re-encoded.
    Image.open(root / "images" / "item1.png").save(root / "images" / "item1.jpg", quality=80)
    (root / "images" / "item1.png").unlink()
    assert main(["data", "prepare", str(root), "--output", str(tmp_path / "prepared")]) == 0
    items = tfds_style.read(tmp_path / "prepared")
    expected = find_style_items(root / "images", captions=root / "captions", negatives=root / "negatives")
    assert items == expected and [item.stem for item in items] == ["item0", "item1", "item2", "item3"]
    assert items[1].image[:2] == b"\xff\xd8"  # JPEG
    np.testing.assert_array_equal(build_style_dataset(items, 16).positives, build_style_dataset(expected, 16).positives)
    with pytest.raises(UserError, match="no split 'trainA'"):
        tfds_style.read(tmp_path / "prepared", "trainA")
    with pytest.raises(UserError, match="already exists"):
        tfds_style.prepare(tmp_path / "prepared", root)
    with pytest.raises(UserError, match="not a dataset written by"):
        tfds_style.read(root)


def test_cyclegan_layout_has_one_split_per_folder(tmp_path):
    source = tmp_path / "monet2photo"
    rng = np.random.default_rng(0)
    for split, count in (("trainA", 3), ("testA", 2)):
        (source / split).mkdir(parents=True)
        (tmp_path / "captions" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (16, 20, 3), np.uint8)).save(source / split / f"{i:05d}.jpg")
            (tmp_path / "captions" / split / f"{i:05d}.txt").write_text(f"{split} caption {i}")
    counts = tfds_style.prepare(tmp_path / "prepared", source, captions=tmp_path / "captions")
    assert counts == {"trainA": 3, "testA": 2}
    test_items = tfds_style.read(tmp_path / "prepared", "testA")
    assert [item.caption for item in test_items] == ["testA caption 0", "testA caption 1"]
    assert all(item.negative is None for item in test_items)


def test_a_bad_dataset_writes_nothing(tmp_path):
    root = write_style_dataset(tmp_path / "style")
    (root / "captions" / "item0.txt").unlink()
    (root / "negatives" / "item1.png").unlink()
    (root / "images" / "item2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError) as error:
        tfds_style.prepare(tmp_path / "prepared", root)
    for path in ("captions/item0.txt", "negatives/item1.png", "images/item2.png"):
        assert str(root / path) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style"]
    with pytest.warns(UserWarning, match="skipping 3 bad item"):
        assert tfds_style.prepare(tmp_path / "prepared", root, skip_bad_items=True) == {"train": 1}


def test_training_from_a_prepared_dataset_equals_training_from_folders(sd1_dir, tmp_path):
    from nsync_jax.train import trainer

    root = write_style_dataset(tmp_path / "style")
    tfds_style.prepare(tmp_path / "prepared", root)
    config = tiny_config(sd1_dir, root, train__steps=2)
    from_folders = trainer.train(config, tmp_path / "folders", progress=False).trained
    config.data.images = config.data.captions = config.data.negatives = ""
    config.data.prepared = str(tmp_path / "prepared")
    np.testing.assert_array_equal(trainer.train(config, tmp_path / "tfds", progress=False).trained, from_folders)
