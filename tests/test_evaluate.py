"""Image reading and each reference tool's preprocessing, then `nsync-jax evaluate` end to end on tiny networks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsync_jax import evaluate
from nsync_jax.errors import UserError
from nsync_jax.models.clip_vision import CLIP_MEAN, CLIP_STD


def _random_image(rng, height, width):
    # Smooth content plus noise: resampling filters differ on both.
    y, x = np.mgrid[0:height, 0:width]
    smooth = 127 + 100 * np.sin(x[..., None] / 7.0 + np.arange(3)) * np.cos(y[..., None] / 11.0)
    return np.clip(smooth + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def test_read_image_folder_converts_and_reports(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(_random_image(rng, 20, 24)).save(tmp_path / "a.png")
    Image.fromarray(_random_image(rng, 20, 24)[..., 0]).save(tmp_path / "b.png")  # grayscale
    Image.fromarray(np.dstack([_random_image(rng, 20, 24), np.full((20, 24), 255, np.uint8)])).save(tmp_path / "c.png")
    (tmp_path / "d.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = evaluate.read_image_folder(tmp_path)
    assert folder.stems == ["a", "b", "c"]
    assert all(image.shape == (20, 24, 3) and image.dtype == np.uint8 for image in folder.images)
    assert folder.converted == {"L": 1, "RGBA": 1}
    assert [bad["file"] for bad in folder.unreadable] == ["d.jpg"]
    np.testing.assert_array_equal(folder.images[1][..., 0], folder.images[1][..., 2])  # gray tiled to RGB
    (tmp_path / "one").mkdir()
    Image.fromarray(_random_image(rng, 8, 8)).save(tmp_path / "one" / "x.png")
    with pytest.raises(UserError, match="at least 2"):
        evaluate.read_image_folder(tmp_path / "one")
    with pytest.raises(UserError, match="not found"):
        evaluate.read_image_folder(tmp_path / "missing")


def test_gan_metrics_input_is_torch_bilinear():
    import torch
    import torch.nn.functional as F

    image = _random_image(np.random.default_rng(1), 256, 200)
    expected = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, size=(299, 299),
                             mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy() * 2 - 1
    np.testing.assert_allclose(evaluate.gan_metrics_input(image), expected, atol=1e-5)


def test_clean_fid_input_is_pil_float_bicubic():
    import jax

    image = _random_image(np.random.default_rng(2), 256, 256)
    out = evaluate.clean_fid_input(image)
    assert out.shape == (299, 299, 3)
    # clean-fid's PIL 'F' bicubic agrees with an antialiased float bicubic (clipped) to a few thousandths of a
    # grey level; the uint8 PIL path, bilinear, or the 2x-1 scaling would all be off by far more.
    reference = np.clip(np.asarray(jax.image.resize(image.astype(np.float32), (299, 299, 3), "bicubic")), 0, 255)
    np.testing.assert_allclose(out * 128 + 128, reference, atol=0.02)


def test_clip_input_matches_transformers_clip_image_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(3)
    for height, width in ((45, 61), (64, 37), (32, 32)):
        image = _random_image(rng, height, width)
        expected = processor(images=Image.fromarray(image), return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        np.testing.assert_allclose(evaluate.clip_input(image, 32), expected, atol=1e-5)


def test_cmmd_input_crops_a_centred_square_first():
    image = _random_image(np.random.default_rng(4), 40, 60)
    out = evaluate.cmmd_input(image, 16)
    square = Image.fromarray(image[:, 10:50]).resize((16, 16), Image.Resampling.BICUBIC)
    expected = (np.asarray(square, np.float32) / 255 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    np.testing.assert_allclose(out, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# `nsync-jax evaluate` on tiny random networks of every kind
# ------------------------------------------------------------------------------------------------------------

CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                   image_size=32)


def save_tiny_clip(folder: Path, tokenizer_dir: Path, scale: float = 0.1):
    """A tiny random transformers CLIPModel (image tower CLIP_VISION) with the tiny tokenizer, saved in `folder` as
    a metric network's folder; returns the model and tokenizer."""
    import shutil

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from conftest import _randomize

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=CLIP_VISION, projection_dim=16)).eval()
    _randomize(clip, scale)
    clip.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return clip, tokenizer


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory, tiny_tokenizer_dir):
    """A --weights folder: both Inceptions (random), a CLIP image tower, a CLIP model with tokenizer, CSD."""
    import torch
    from safetensors.numpy import save_file
    from test_clip_vision import csd_checkpoint
    from test_inception import torch_state
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from conftest import _randomize
    from nsync_jax.convert import convert_csd

    folder = tmp_path_factory.mktemp("metric_weights")
    for variant in ("fid", "torchvision"):
        save_file(torch_state(variant), folder / f"inception-{variant}.safetensors")
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION, projection_dim=24)).eval()
    _randomize(vision)
    vision.save_pretrained(folder / "clip-vit-large-patch14-336")
    clip, tokenizer = save_tiny_clip(folder / "clip-vit-large-patch14", tiny_tokenizer_dir)
    fixture = np.load(Path(__file__).parent / "fixtures" / "openai_clip_tiny.npz")
    convert_csd(csd_checkpoint(fixture, folder / "csd.pth"), folder / "csd")
    return folder, vision, clip, tokenizer


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    (root / "real").mkdir(), (root / "generated").mkdir(), (root / "captions").mkdir()
    for i in range(6):
        Image.fromarray(_random_image(rng, 40, 48)).save(root / "real" / f"r{i}.png")
    words = ["a red star", "a blue circle", "a cat", "a dog in the style of painting", "a photo of a circle"]
    for i, caption in enumerate(words):
        image = Image.fromarray(_random_image(rng, 48, 40) // 2 + 60)
        (image.convert("L") if i == 0 else image).save(root / "generated" / f"g{i}.png")
        (root / "captions" / f"g{i}.txt").write_text(caption)
    (root / "generated" / "g5.png").write_bytes(b"\x89PNG truncated")
    return root, words


def test_evaluate_command_writes_every_metric(metric_weights, image_folders, capsys):
    import json

    import torch
    from transformers import CLIPImageProcessor

    from nsync_jax import cli, metrics

    weights_dir, vision, clip, tokenizer = metric_weights
    root, words = image_folders
    out = root / "scores.json"
    assert cli.main(["evaluate", "--real", str(root / "real"), "--generated", str(root / "generated"),
                     "--captions", str(root / "captions"), "--metrics", "fid,kid,cmmd,csd,clip",
                     "--weights", str(weights_dir), "--output", str(out), "--batch-size", "6"]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "g5.png" in printed and "cmmd" in printed
    assert result["real"]["images"] == 6 and result["generated"]["images"] == 5
    assert result["generated"]["converted_to_rgb"] == {"L": 1}
    assert [bad["file"] for bad in result["generated"]["unreadable"]] == ["g5.png"]
    scores = result["metrics"]
    assert list(scores) == ["fid", "kid", "cmmd", "csd", "clip"]
    assert all(np.isfinite(s["value"]) for s in scores.values())
    assert scores["kid"]["subset_size"] == 5 and scores["fid"]["images_real"] == 6
    assert scores["csd"]["images_generated"] == 5 and scores["clip"]["images"] == 5

    # CMMD and CLIP score against transformers' PyTorch models and processor on the same files.
    generated = evaluate.read_image_folder(root / "generated")
    real = evaluate.read_image_folder(root / "real")
    with torch.no_grad():
        def torch_cmmd_embeds(folder):
            pixels = np.stack([evaluate.cmmd_input(image, 32) for image in folder.images]).transpose(0, 3, 1, 2)
            embeds = vision(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
            return embeds / np.linalg.norm(embeds, axis=1, keepdims=True)

        assert scores["cmmd"]["value"] == pytest.approx(
            metrics.cmmd(torch_cmmd_embeds(real), torch_cmmd_embeds(generated)).value, rel=1e-3)
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        pixels = processor(images=[Image.fromarray(i) for i in generated.images], return_tensors="pt").pixel_values
        ids = tokenizer(words, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        image_emb = clip.get_image_features(pixel_values=pixels)
        text_emb = clip.get_text_features(input_ids=ids)
        image_emb = getattr(image_emb, "pooler_output", image_emb).numpy()
        text_emb = getattr(text_emb, "pooler_output", text_emb).numpy()
    assert scores["clip"]["value"] == pytest.approx(metrics.clip_score(image_emb, text_emb).value, rel=1e-4, abs=1e-4)

    # The NSYNC protocol on a folder against itself (plain FID 0): the torchvision Inception, and a bootstrap
    # FID of resampled sets, which repeat images, above it.
    assert cli.main(["evaluate", "--real", str(root / "real"), "--generated", str(root / "real"), "--protocol",
                     "nsync", "--metrics", "fid", "--weights", str(weights_dir), "--output", str(out),
                     "--batch-size", "6"]) == 0
    fid = json.loads(out.read_text())["metrics"]["fid"]
    assert fid["bootstrap_draws"] == 10 and fid["std"] > 0 and fid["value"] > 0


def test_evaluate_command_errors(metric_weights, image_folders, tmp_path, capsys, empty_hf_cache):
    from nsync_jax import cli

    weights_dir = metric_weights[0]
    root, _ = image_folders
    base = ["evaluate", "--real", str(root / "real"), "--generated", str(root / "generated"), "--output",
            str(tmp_path / "out.json")]
    assert cli.main(base + ["--weights", str(tmp_path), "--metrics", "fid"]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'inception-fid.safetensors'}: not found" in error and "pt_inception-2015-12-05" in error
    assert cli.main(base + ["--weights", str(weights_dir), "--metrics", "fid,is"]) == 2
    assert "--metrics: unknown metric 'is'" in capsys.readouterr().err
    assert cli.main(base + ["--weights", str(weights_dir), "--metrics", "clip"]) == 2
    assert "--captions" in capsys.readouterr().err
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "g0.txt").write_text("a cat")
    assert cli.main(base + ["--weights", str(weights_dir), "--metrics", "clip", "--captions",
                            str(tmp_path / "captions")]) == 2
    assert f"{tmp_path / 'captions' / 'g1.txt'}: no caption" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
