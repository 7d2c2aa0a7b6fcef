"""Style datasets as a tensorflow-datasets builder, written as array_record and read back without TensorFlow.

`nsync-jax data prepare` validates a style dataset once (every problem listed, as `find_style_items` does) and
writes it under `--output` as the tfds dataset `nsync_style`; training then reads it with
`config.data.prepared=DIR` (and `config.data.split`), by random access through `tfds.data_source`, which
needs no TensorFlow. Two layouts are accepted as the builder's manual directory:

* NSYNC's: `images/`, `captions/` (optional), `negatives/` (optional): one split, `train`;
* CycleGAN's extracted `monet2photo/`, `vangogh2photo/`, ... folders: `trainA/`, `testA/`, `trainB/`, `testB/`,
  one split each, as tfds' own `cycle_gan` builder names them (that builder needs TensorFlow to prepare).
  Captions and negatives come from separate folders (`--captions`, `--negatives`) holding one subfolder per
  split (`captions/trainA/<stem>.txt`), the layout of the NSYNC code's `datasets/prompts/<style>/<split>/`.

Images are stored as the original encoded files (no re-encoding: JPEGs stay bit-identical) and decoded by
`style_dataset.decode_image`, the function the folder path uses, so both paths give the same arrays.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

from nsync_jax.data.style_dataset import StyleItem, find_style_items
from nsync_jax.errors import UserError
from nsync_jax.files import atomic_folder

NAME = "nsync_style"
CYCLEGAN_SPLITS = ("trainA", "testA", "trainB", "testB")


def _tfds():
    # Imported on first use: tensorflow_datasets takes a second to import and most commands never need it.
    import tensorflow_datasets as tfds

    return tfds


def source_splits(root: Path, captions: Path | None, negatives: Path | None) -> dict[str, dict]:
    """`{split: find_style_items arguments}` for an NSYNC-layout or a CycleGAN-layout folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    if (root / "images").is_dir():
        return {"train": dict(images=root / "images", captions=captions or _existing(root / "captions"),
                              negatives=negatives or _existing(root / "negatives"))}
    splits = [s for s in CYCLEGAN_SPLITS if (root / s).is_dir()]
    if not splits:
        raise UserError(f"{root}: neither NSYNC's layout (images/) nor CycleGAN's (trainA/, testA/, ...)")
    return {s: dict(images=root / s, captions=captions and _existing(Path(captions) / s),
                    negatives=negatives and _existing(Path(negatives) / s)) for s in splits}


def _existing(folder: Path) -> Path | None:
    return folder if folder.is_dir() else None


@functools.cache  # tfds registers builder classes by name: define it once
def _builder_class():
    tfds = _tfds()

    @dataclasses.dataclass
    class StyleConfig(tfds.core.BuilderConfig):
        with_negatives: bool = False

    class NsyncStyle(tfds.core.GeneratorBasedBuilder):
        """Style images with their captions and, when given, their caption-matched negatives."""

        name = NAME
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Images, captions and optional negatives; encoded files stored as they are."}
        BUILDER_CONFIGS = [StyleConfig(name="positives"), StyleConfig(name="with_negatives", with_negatives=True)]
        MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder in NSYNC's layout (images/, captions/, negatives/) or CycleGAN's."

        def __init__(self, *, splits: dict[str, list[StyleItem]] | None = None, **kwargs):
            self._splits = splits  # only when preparing; reading needs only the files
            super().__init__(**kwargs)

        def _info(self):
            features = {"stem": tfds.features.Text(), "caption": tfds.features.Text(),
                        "image": tfds.features.Image(shape=(None, None, 3))}
            if self.builder_config.with_negatives:
                features["negative"] = tfds.features.Image(shape=(None, None, 3))
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(items) for split, items in self._splits.items()}

        def _generate_examples(self, items):
            for item in items:
                example = {"stem": item.stem, "caption": item.caption, "image": _encoded(item.image)}
                if self.builder_config.with_negatives:
                    example["negative"] = _encoded(item.negative)
                yield item.stem, example

    return NsyncStyle


def _encoded(data: bytes):
    """An encoded image as tfds' Image feature takes it without decoding (a file object)."""
    return io.BytesIO(data)


def prepare(output: Path, root: Path, *, captions: Path | None = None, negatives: Path | None = None,
            skip_bad_items: bool = False) -> dict[str, int]:
    """Validates every split of the dataset at `root`, then writes it under `output`; `{split: examples}`.

    Every split is validated before anything is written; the dataset is built in a temporary folder and
    renamed, so `output` holds a complete dataset or none.
    """
    with atomic_folder(output, exists_hint="choose a new --output") as temporary:
        splits = {split: find_style_items(**sources, skip_bad_items=skip_bad_items)
                  for split, sources in source_splits(root, captions, negatives).items()}
        with_negatives = {all(item.negative is not None for item in items) for items in splits.values()}
        if len(with_negatives) != 1:
            raise UserError(f"{negatives}: negatives exist for some splits only ({', '.join(splits)})")
        config = "with_negatives" if with_negatives.pop() else "positives"
        builder = _builder_class()(splits=splits, config=config, data_dir=str(temporary),
                                   file_format="array_record")
        builder.download_and_prepare(download_config=_tfds().download.DownloadConfig(manual_dir=str(root)))
    return {split: len(items) for split, items in splits.items()}


def read(prepared: Path, split: str = "train") -> list[StyleItem]:
    """The items of one split of a dataset written by `prepare`, in stem order."""
    tfds = _tfds()
    prepared = Path(prepared)
    configs = [c for c in ("with_negatives", "positives") if (prepared / NAME / c).is_dir()]
    if not configs:
        raise UserError(f"{prepared}: not a dataset written by `nsync-jax data prepare` (no {NAME}/ inside)")
    builder = tfds.builder(f"{NAME}/{configs[0]}", data_dir=str(prepared))
    if split not in builder.info.splits:
        raise UserError(f"{prepared}: no split {split!r} (it has {', '.join(builder.info.splits)})")
    # The encoded files come back as bytes: decoding stays with Pillow, as for folders (tfds' own image
    # decoder wants OpenCV).
    skip = tfds.decode.SkipDecoding()
    source = builder.as_data_source(split=split, decoders={"image": skip, "negative": skip}
                                    if configs[0] == "with_negatives" else {"image": skip})
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    items = [StyleItem(text(ex["stem"]), ex["image"], text(ex["caption"]), ex.get("negative"))
             for ex in (source[i] for i in range(len(source)))]
    return sorted(items, key=lambda item: item.stem)
