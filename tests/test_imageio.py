"""One image-folder reader and one caption reader (`imageio`): their rules, and the same one-line error for a bad
caption whichever command reads it (the dataset, `caption`, `negatives`, `evaluate`, `edit`)."""
from __future__ import annotations

import types

import pytest
from PIL import Image

from nsync_jax import imageio
from nsync_jax.errors import UserError
from conftest import write_style_dataset


def test_image_files_sorted_by_name_and_only_images(tmp_path):
    for name in ("b.PNG", "a.jpg", "a_att.png", "c.webp", "d.jpeg", "e.bmp"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()  # a folder is not an image, whatever its name
    assert [p.name for p in imageio.image_files(tmp_path)] == ["a.jpg", "a_att.png", "b.PNG", "c.webp", "d.jpeg",
                                                              "e.bmp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"^{tmp_path / 'empty'}: no images \\(.png, .jpg, .jpeg, .webp, .bmp\\)$"):
        imageio.image_files(tmp_path / "empty")
    with pytest.raises(UserError, match=f"^{tmp_path / 'nope'}: negatives folder not found$"):
        imageio.image_files(tmp_path / "nope", "negatives")


def test_read_caption_one_line_and_errors_naming_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("  a red\n star\tat  dawn \n")
    assert imageio.read_caption(tmp_path / "a.txt") == "a red star at dawn"
    (tmp_path / "empty.txt").write_text(" \n\t\n")
    with pytest.raises(UserError, match=f"^{tmp_path / 'empty.txt'}: the caption is empty$"):
        imageio.read_caption(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=f"^{tmp_path / 'latin1.txt'}: cannot read the caption \\(UnicodeDecodeError"):
        imageio.read_caption(tmp_path / "latin1.txt")
    with pytest.raises(UserError, match=f"^{tmp_path / 'missing.txt'}: cannot read the caption \\(FileNotFoundError"):
        imageio.read_caption(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="^--caption: the caption is empty$"):
        imageio.caption_text("   ", "--caption")


def test_read_captions_every_file_or_the_stems_asked(tmp_path):
    for stem, text in (("b", "a blue circle"), ("a", "a red  star\n")):
        (tmp_path / f"{stem}.txt").write_text(text)
    assert imageio.read_captions(tmp_path) == {"a": "a red star", "b": "a blue circle"}
    assert list(imageio.read_captions(tmp_path)) == ["a", "b"]
    assert imageio.read_captions(tmp_path, ["b", "b"]) == {"b": "a blue circle"}
    with pytest.raises(UserError, match=f"^{tmp_path / 'c.txt'}: no caption for image 'c' \\(2 missing\\)$"):
        imageio.read_captions(tmp_path, ["a", "c", "d"])
    with pytest.raises(UserError, match=f"^{tmp_path / 'nope'}: captions folder not found$"):
        imageio.read_captions(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"^{tmp_path / 'empty'}: no caption files \\(\\*.txt\\)$"):
        imageio.read_captions(tmp_path / "empty")


@pytest.mark.parametrize("content", [b"  \n\t", b"\xff\xfe\xfa"], ids=["empty", "undecodable"])
def test_a_bad_caption_is_the_same_one_line_error_everywhere(tmp_path, content):
    """The dataset lists it among its problems; `negatives`, `caption` and `evaluate` raise it as it is; `edit`
    takes captions from flags, and says the same of an empty one, naming the flag."""
    from nsync_jax import captions, evaluate, negatives
    from nsync_jax.data.style_dataset import find_style_items
    from nsync_jax.editing import editor

    root = write_style_dataset(tmp_path / "style")
    bad = root / "captions" / "item1.txt"
    bad.write_bytes(content)
    with pytest.raises(UserError) as expected:
        imageio.read_caption(bad)
    message = str(expected.value)
    assert message.startswith(f"{bad}: ") and "\n" not in message

    with pytest.raises(UserError) as error:
        find_style_items(root / "images", captions=root / "captions", negatives=root / "negatives")
    assert message in str(error.value).split(": ", 2)[2].split("; ")  # one of the listed problems, word for word
    with pytest.warns(UserWarning, match="skipping 1 bad item"):
        kept = find_style_items(root / "images", captions=root / "captions", negatives=root / "negatives",
                                skip_bad_items=True)
    assert [item.stem for item in kept] == ["item0", "item2", "item3"]

    errors = {}
    with pytest.raises(UserError) as error:
        negatives.prepare_prompts(types.SimpleNamespace(tokenizer=None), negatives.DEFAULT_TEMPLATE,
                                  captions=root / "captions", style_phrase=negatives.DEFAULT_STYLE_PHRASE)
    errors["negatives"] = str(error.value)

    # `caption` keeps existing captions: one it would keep must read (checked before the captioner loads).
    with pytest.raises(UserError) as error:
        captions.caption_folder(root / "images", root / "captions", tmp_path / "no-captioner", progress=False)
    errors["caption"] = str(error.value)

    # The clip metric reads the caption of each generated image (here the style images) before any network.
    with pytest.raises(UserError) as error:
        evaluate.evaluate(evaluate.Evaluation("standard", ("clip",), tmp_path / "no-weights"), root / "images",
                          root / "images", root / "captions")
    errors["evaluate"] = str(error.value)
    assert errors == dict.fromkeys(errors, message)

    inputs = editor.InputImages([root / "images" / "item0.png"], [Image.new("RGB", (8, 8))])
    with pytest.raises(UserError, match="^--caption: the caption is empty$"):
        editor._captions(inputs, [" \n "], None)
