"""`evaluate --protocol styleforge` against a direct torch computation of StyleForge's scripts on tiny networks:
pytorch-fid's input for FID, KID with the real images resized to 512 first, and the per-prompt CLIP score
(torchmetrics' clip_score: transformers' CLIP and processor) over each prompt's images."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from nsync_jax import evaluate, metrics
from nsync_jax.errors import UserError

LONG = "a raccoon wearing formal clothes, wearing a tophat and holding a cane, in the style of Hokusai"
# Prompt stem -> (prompt, images of it): "p3" repeats p0's text but is a prompt of its own (as prompt.txt repeats
# "a girl"); "p2" is longer than 77 characters, so StyleForge's CLIP script skips it.
PROMPTS = {"p0": ("a cat", 2), "p1": ("a dog on a sofa", 2), "p2": (LONG, 2), "p3": ("a cat", 1)}


def _image(rng, height, width):
    y, x = np.mgrid[0:height, 0:width]
    smooth = 127 + 100 * np.sin(x[..., None] / 5.0 + np.arange(3)) * np.cos(y[..., None] / 9.0)
    return np.clip(smooth + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, tiny_tokenizer_dir):
    """--weights with the FID Inception (random) and a tiny random CLIP under the ViT-B/16 name."""
    import torch
    from safetensors.numpy import save_file
    from test_evaluate import save_tiny_clip
    from test_inception import torch_state

    folder = tmp_path_factory.mktemp("weights")
    save_file(torch_state("fid"), folder / "inception-fid.safetensors")
    torch.manual_seed(3)
    clip, tokenizer = save_tiny_clip(folder / "clip-vit-base-patch16", tiny_tokenizer_dir, 0.3)
    return folder, clip, tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Real images of mixed sizes; generated images `<prompt stem>_<k>.png` (and `p3.png`) with their captions
    as a folder and as a prompt list (`img_<i>_<k>.png`)."""
    root = tmp_path_factory.mktemp("styleforge")
    rng = np.random.default_rng(5)
    for name in ("real", "generated", "captions", "generated_from_list"):
        (root / name).mkdir()
    for i, (height, width) in enumerate([(40, 48), (64, 64), (36, 30), (48, 48), (56, 40)]):
        Image.fromarray(_image(rng, height, width)).save(root / "real" / f"r{i}.png")
    for line, (stem, (prompt, count)) in enumerate(PROMPTS.items()):
        (root / "captions" / f"{stem}.txt").write_text(prompt)
        for k in range(count):
            image = Image.fromarray(_image(rng, 32, 32) // 2 + 40)
            image.save(root / "generated" / (f"{stem}_{k}.png" if count > 1 else f"{stem}.png"))
            image.save(root / "generated_from_list" / f"img_{line}_{k}.png")
    (root / "prompts.txt").write_text("\n".join(prompt for prompt, _ in PROMPTS.values()) + "\n")
    return root


def _torch_inception_inputs(images):
    """pytorch-fid's preprocessing in torch: ToTensor, bilinear to 299 (align_corners=False), 2x - 1; NHWC."""
    import torch
    import torch.nn.functional as F

    resized = [F.interpolate(torch.from_numpy(np.array(i)).permute(2, 0, 1)[None].float() / 255, size=(299, 299),
                             mode="bilinear", align_corners=False) for i in images]
    return (2 * torch.cat(resized) - 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.slow  # two Inception compiles at 299 x 299: about 2 minutes on 2 busy CPU cores
def test_fid_and_kid_follow_pytorch_fid_and_the_kid_script(weights_dir, folders):
    from nsync_jax.models.inception import load_inception

    folder = weights_dir[0]
    ev = evaluate.Evaluation("styleforge", ("fid", "kid"), folder, batch_size=4, kid_subsets=4)
    result = evaluate.evaluate(ev, folders / "real", folders / "generated")["metrics"]

    model = load_inception(folder / "inception-fid.safetensors", "fid")
    real = evaluate.read_image_folder(folders / "real").images
    generated = evaluate.read_image_folder(folders / "generated").images
    # The real images resized to 512 x 512 with Pillow's default filter, as the released KID script does.
    resized = [np.asarray(Image.fromarray(i).resize((512, 512), Image.Resampling.BICUBIC)) for i in real]
    inputs = _torch_inception_inputs(real + generated + resized)
    features = evaluate.batched_features(model, lambda m, x: m(x), iter(inputs), len(inputs), 4)
    real_f, gen_f, resized_f = np.split(features, np.cumsum([len(real), len(generated)]))
    assert result["fid"]["value"] == pytest.approx(metrics.frechet_distance(real_f, gen_f), rel=1e-4)
    assert result["fid"]["images_real"] == 5 and result["fid"]["images_generated"] == 7

    expected = metrics.kernel_inception_distance(resized_f, gen_f, 1000, 4, 0)
    assert result["kid"]["value"] == pytest.approx(expected.value, rel=1e-4, abs=1e-9)
    unresized = metrics.kernel_inception_distance(real_f, gen_f, 1000, 4, 0)
    assert abs(unresized.value - expected.value) > 1e-3 * abs(expected.value)  # the resize is not a no-op


def torch_clip_score(clip, tokenizer, images, prompt):
    """torchmetrics' functional clip_score on one prompt's images: transformers' processor and CLIP,
    100 * cos per image, the mean clamped at 0."""
    import torch
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt").pixel_values
        text = tokenizer([prompt] * len(images), padding=True, return_tensors="pt")
        image_emb = clip.get_image_features(pixel_values=pixels)
        text_emb = clip.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        image_emb = getattr(image_emb, "pooler_output", image_emb)
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return max(float((100 * (image_emb * text_emb).sum(-1)).mean()), 0.0)


@pytest.mark.parametrize("source", ["folder", "prompt_list"])
def test_clip_score_per_prompt_matches_torch(weights_dir, folders, source, monkeypatch):
    folder, clip, tokenizer = weights_dir
    generated_dir, captions = ((folders / "generated", folders / "captions") if source == "folder" else
                               (folders / "generated_from_list", folders / "prompts.txt"))
    ev = evaluate.Evaluation("styleforge", ("clip",), folder, batch_size=4)
    score = evaluate.evaluate(ev, folders / "real", generated_dir, captions)["metrics"]["clip"]
    assert score["released_prompt_list"] is False
    if source == "prompt_list":  # a list whose bytes are the released prompt.txt's is recognised
        monkeypatch.setattr(evaluate, "STYLEFORGE_PROMPTS_SHA256", hashlib.sha256(captions.read_bytes()).hexdigest())
        assert evaluate.evaluate(ev, folders / "real", generated_dir, captions)["metrics"]["clip"][
            "released_prompt_list"] is True

    generated = evaluate.read_image_folder(generated_dir)
    per_prompt = []
    for line, (stem, (prompt, count)) in enumerate(PROMPTS.items()):
        if len(prompt) > 77:
            continue
        prefix = stem if source == "folder" else f"img_{line}"
        images = [i for s, i in zip(generated.stems, generated.images) if s == prefix or s.startswith(prefix + "_")]
        assert len(images) == count
        per_prompt.append(torch_clip_score(clip, tokenizer, images, prompt))
    assert any(per_prompt)  # not every prompt clamped to 0
    assert score["value"] == pytest.approx(np.mean(per_prompt), rel=1e-4, abs=1e-4)
    assert (score["prompts"], score["prompts_skipped"], score["images"]) == (3, 1, 5)


def test_clip_errors_name_the_captions(weights_dir, folders, tmp_path):
    ev = evaluate.Evaluation("styleforge", ("clip",), weights_dir[0])
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "p0.txt").write_text("a cat")
    with pytest.raises(UserError, match=r"captions: no caption for image 'p1_0' \(5 missing\)"):
        evaluate.evaluate(ev, folders / "real", folders / "generated", tmp_path / "captions")
    (tmp_path / "long.txt").write_text("\n".join([LONG] * 4))
    with pytest.raises(UserError, match="longer than 77 characters"):
        evaluate.evaluate(ev, folders / "real", folders / "generated_from_list", tmp_path / "long.txt")


@pytest.mark.filterwarnings("ignore:.*longer than the text encoder")  # the tiny tokenizer has 16
def test_sample_prompts_file_then_evaluate(sd1_dir, weights_dir, folders, tmp_path):
    """The documented pair of commands: `sample --prompts-file --num-images 2 --template` names its images so that
    `evaluate --protocol styleforge --captions` finds each image's raw line."""
    import json

    from nsync_jax.cli import main

    prompts = folders / "prompts.txt"
    assert main(["sample", "--model", str(sd1_dir), "--prompts-file", str(prompts), "--num-images", "2",
                 "--template", "a photo of zwx style, {caption}", "--steps", "2", "--scheduler", "ddim",
                 "--negative-prompt", "(worst quality, low quality:1.2), blurry", "--output",
                 str(tmp_path / "drawn")]) == 0
    assert main(["evaluate", "--protocol", "styleforge", "--real", str(folders / "real"), "--generated",
                 str(tmp_path / "drawn"), "--captions", str(prompts), "--metrics", "clip", "--weights",
                 str(weights_dir[0]), "--output", str(tmp_path / "scores.json")]) == 0
    clip = json.loads((tmp_path / "scores.json").read_text())["metrics"]["clip"]
    assert (clip["prompts"], clip["prompts_skipped"], clip["images"]) == (3, 1, 6)
