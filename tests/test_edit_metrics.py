"""`evaluate-edits` against direct torch computations with the same (random) weights: the DINO ViT and its
structure distance (transformers' ViTModel, Splice's formulas), LPIPS (torchvision-layout backbones and lpips'
heads, lpips' arithmetic), CLIP accuracy and score (transformers' CLIPModel); their converters; the command's
errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import load_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from conftest import _randomize, jitted
from nsync_jax import cli, evaluate
from nsync_jax.convert import convert_dino, convert_lpips
from nsync_jax.edit_metrics import self_similarity
from nsync_jax.errors import UserError
from nsync_jax.models.lpips import SCALE, SHIFT, load_lpips
from nsync_jax.models.vit import IMAGENET_MEAN, IMAGENET_STD, load_vit

VIT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
           image_size=16, layer_norm_eps=1e-6)
SIZE = 64  # the images' side: AlexNet's stride-4 stem and two pools leave 3 x 3 at its last tap


def rel_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


# ------------------------------------------------------------------------------------------------ DINO ViT

@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**VIT)).eval()  # with its pooler, as facebook/dino-vitb8 is saved
    _randomize(model)
    folder = tmp_path_factory.mktemp("vit")
    model.save_pretrained(folder)
    return model, folder


def torch_keys(model: ViTModel, folder: Path, pixels_nchw: np.ndarray) -> torch.Tensor:
    """The last layer's keys, from its input hidden state and the saved weights (names stable across versions)."""
    state = {k: torch.from_numpy(v) for k, v in load_file(folder / "model.safetensors").items()}
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(pixels_nchw), output_hidden_states=True).hidden_states[-2]
        last = f"encoder.layer.{VIT['num_hidden_layers'] - 1}."
        x = F.layer_norm(hidden, (VIT["hidden_size"],), state[last + "layernorm_before.weight"],
                         state[last + "layernorm_before.bias"], VIT["layer_norm_eps"])
        return F.linear(x, state[last + "attention.attention.key.weight"], state[last + "attention.attention.key.bias"])


def splice_self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Splice's `attn_cosine_sim` of one image's keys `(tokens, hidden)`."""
    x = keys[None]
    norms = x.norm(dim=2, keepdim=True)
    return (x @ x.permute(0, 2, 1)) / torch.clamp(norms @ norms.permute(0, 2, 1), min=1e-8)


def test_vit_matches_transformers_and_splice(vit):
    model, folder = vit
    ours = load_vit(folder)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    nhwc = pixels.transpose(0, 2, 3, 1)
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert rel_error(jitted(ours)(nhwc), hidden) <= 1e-4
    keys = torch_keys(model, folder, pixels)
    our_keys = np.asarray(jitted(ours, "last_layer_keys")(nhwc))
    assert our_keys.shape == (2, 17, VIT["hidden_size"]) and rel_error(our_keys, keys) <= 1e-4
    similarity = np.asarray(self_similarity(our_keys))
    reference = [splice_self_similarity(k)[0] for k in keys]
    assert rel_error(similarity, torch.stack(reference)) <= 1e-4
    distance = F.mse_loss(reference[0], reference[1]).item()
    assert ((similarity[0] - similarity[1]) ** 2).mean() == pytest.approx(distance, rel=1e-4)


def dino_release_state(model: ViTModel, folder: Path) -> dict:
    """The ViT's weights in DINO's release layout (timm's names, fused qkv), as `dino_vitbase8_pretrain.pth`."""
    state = {k: torch.from_numpy(v) for k, v in load_file(folder / "model.safetensors").items()}
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    for i in range(VIT["num_hidden_layers"]):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.qkv.{leaf}"] = torch.cat([state[f"{src}attention.attention.{n}.{leaf}"]
                                                      for n in ("query", "key", "value")])
            for theirs, ours in (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                                 ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                                 ("mlp.fc2", "output.dense")):
                out[f"{dst}{theirs}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
    return out


def test_convert_dino_gives_the_transformers_model(vit, tmp_path):
    model, folder = vit
    release = dino_release_state(model, folder)
    torch.save(release, tmp_path / "dino.pth")
    # DINO's heads are width // 64; this tiny width has none, so the converted file is checked on a wider copy.
    with pytest.raises(UserError, match="multiple of 64"):
        convert_dino(tmp_path / "dino.pth", tmp_path / "dino")
    config = dict(VIT, hidden_size=64, intermediate_size=40, num_attention_heads=1)
    torch.manual_seed(1)
    wide = ViTModel(ViTConfig(**config), add_pooling_layer=False).eval()
    _randomize(wide)
    wide.save_pretrained(tmp_path / "wide")
    torch.save(dino_release_state(wide, tmp_path / "wide"), tmp_path / "wide.pth")
    assert cli.main(["convert-weights", "dino-vit", str(tmp_path / "wide.pth"), str(tmp_path / "dino")]) == 0
    converted = tmp_path / "dino"
    saved = json.loads((converted / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["image_size"], saved["layer_norm_eps"]) == (1, 16, 1e-6)
    pixels = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(jitted(load_vit(converted))(pixels), jitted(load_vit(tmp_path / "wide"))(pixels))
    release = dino_release_state(wide, tmp_path / "wide")
    release["head.weight"] = torch.zeros(3, 64)
    torch.save(release, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="unexpected weight 'head.weight'"):
        convert_dino(tmp_path / "extra.pth", tmp_path / "dino2")
    assert not (tmp_path / "dino2").exists()


# ------------------------------------------------------------------------------------------------ LPIPS

def torchvision_features(net: str) -> torch.nn.Sequential:
    """torchvision's `alexnet().features` / `vgg16().features`, same indices, so the same state-dict keys."""
    if net == "alex":
        conv = torch.nn.Conv2d
        layers = [conv(3, 64, 11, 4, 2), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2), conv(64, 192, 5, padding=2),
                  torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2), conv(192, 384, 3, padding=1), torch.nn.ReLU(),
                  conv(384, 256, 3, padding=1), torch.nn.ReLU(), conv(256, 256, 3, padding=1), torch.nn.ReLU(),
                  torch.nn.MaxPool2d(3, 2)]
        return torch.nn.Sequential(*layers)
    layers, channels = [], 3
    for width in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if width == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
            channels = width
    return torch.nn.Sequential(*layers)


# lpips' slices end after these ReLUs of torchvision's `features`.
TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}


def torch_lpips(features: torch.nn.Sequential, heads: list[torch.Tensor], net: str, a, b) -> np.ndarray:
    """lpips.LPIPS(net)(a, b) written out: ScalingLayer, tapped features, normalize_tensor, lin heads, averages."""
    shift, scale = torch.tensor(SHIFT).view(1, 3, 1, 1), torch.tensor(SCALE).view(1, 3, 1, 1)

    def taps(x):
        x, out = (x - shift) / scale, []
        for i, layer in enumerate(features[:TAPS[net][-1] + 1]):
            x = layer(x)
            if i in TAPS[net]:
                out.append(x)
        return out

    unit = lambda x: x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + 1e-10)
    with torch.no_grad():
        total = 0
        for head, x, y in zip(heads, taps(torch.as_tensor(a)), taps(torch.as_tensor(b))):
            total = total + F.conv2d((unit(x) - unit(y)) ** 2, head).mean([2, 3], keepdim=True)
    return total.flatten().numpy()


def lpips_files(net: str, folder: Path, seed: int = 0):
    """Random torchvision backbone (with a classifier, as the real file) and lpips heads, saved as the releases are."""
    torch.manual_seed(seed)
    features = torchvision_features(net).eval()
    backbone = {f"features.{k}": v for k, v in features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(10, 4)
    torch.save(backbone, folder / f"{net}-backbone.pth")
    widths = [features[i - 1].out_channels for i in TAPS[net]]
    heads = [torch.rand(1, w, 1, 1) * 0.1 for w in widths]  # lpips' heads are non-negative
    torch.save({f"lin{k}.model.1.weight": h for k, h in enumerate(heads)}, folder / f"{net}.pth")
    return features, heads


def images_pm1(seed: int, size: int) -> np.ndarray:
    """Two random images in [-1, 1], NCHW."""
    return np.random.default_rng(seed).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("net", ["alex", pytest.param("vgg", marks=pytest.mark.slow)])  # VGG: 9 s
def test_lpips_matches_the_lpips_computation(net, tmp_path):
    features, heads = lpips_files(net, tmp_path)
    converted = convert_lpips(tmp_path / f"{net}-backbone.pth", tmp_path / f"{net}.pth",
                              tmp_path / f"lpips-{net}.safetensors", net)
    assert "classifier.1.weight" not in load_file(converted)
    ours = load_lpips(converted, net)
    size = SIZE if net == "alex" else 32  # VGG's four pools leave 2 x 2 at its last tap
    a, b = images_pm1(1, size), images_pm1(2, size)
    reference = torch_lpips(features, heads, net, a, b)
    forward = jitted(ours)
    distance = np.asarray(forward(a.transpose(0, 2, 3, 1), b.transpose(0, 2, 3, 1)))
    assert distance.shape == (2,) and rel_error(distance, reference) <= 1e-4
    assert np.asarray(forward(a.transpose(0, 2, 3, 1), a.transpose(0, 2, 3, 1))) == pytest.approx(0, abs=1e-6)


def test_convert_lpips_errors(tmp_path):
    lpips_files("alex", tmp_path)
    backbone, heads = tmp_path / "alex-backbone.pth", tmp_path / "alex.pth"
    with pytest.raises(UserError, match=r"'features\.0\.weight' has shape .* \(expected LPIPS-vgg: .*vgg16"):
        convert_lpips(backbone, heads, tmp_path / "x.safetensors", "vgg")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1), "scaling.shift": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="unexpected weight 'scaling.shift'"):
        convert_lpips(backbone, tmp_path / "bad.pth", tmp_path / "x.safetensors", "alex")
    assert not (tmp_path / "x.safetensors").exists()
    assert cli.main(["convert-weights", "lpips-alex", str(backbone), str(tmp_path / "y.safetensors")]) == 2


# ------------------------------------------------------------------------------------------------ the command

@pytest.fixture(scope="module")
def edit_weights(tmp_path_factory, tiny_tokenizer_dir, vit):
    """A --weights folder: a tiny CLIP with tokenizer, LPIPS-AlexNet (random), the tiny ViT as dino-vitb8."""
    folder = tmp_path_factory.mktemp("edit_weights")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                  image_size=16)
    torch.manual_seed(2)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    _randomize(clip)
    clip.save_pretrained(folder / "clip-vit-large-patch14")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_tokenizer_dir / name, folder / "clip-vit-large-patch14" / name)
    features, heads = lpips_files("alex", folder)
    assert cli.main(["convert-weights", "lpips-alex", str(folder / "alex-backbone.pth"),
                     str(folder / "lpips-alex.safetensors"), "--lpips-heads", str(folder / "alex.pth")]) == 0
    shutil.copytree(vit[1], folder / "dino-vitb8")
    return folder, clip, tokenizer, features, heads, vit[0]


@pytest.fixture(scope="module")
def edit_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    rng = np.random.default_rng(3)
    for name in ("originals", "edits", "masks", "targets"):
        (root / name).mkdir()
    for i, stem in enumerate(["a", "b", "c"]):
        original = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        edit = np.clip(original.astype(int) + rng.integers(-60, 60, original.shape), 0, 255).astype(np.uint8)
        Image.fromarray(original).save(root / "originals" / f"{stem}.png")
        Image.fromarray(edit).save(root / "edits" / f"{stem}.png")
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8 * i:40, 10:50] = 255
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        (root / "targets" / f"{stem}.txt").write_text(["a photo of a dog", "a red star", "a blue circle"][i])
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "originals" / "extra.png")
    return root


def read(stem: str, folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{stem}.png").convert("RGB"))


def test_evaluate_edits_matches_torch(edit_weights, edit_folders, tmp_path):
    weights_dir, clip, tokenizer, features, heads, dino = edit_weights
    root = edit_folders
    out = tmp_path / "scores.json"
    assert cli.main(["evaluate-edits", "--originals", str(root / "originals"), "--edits", str(root / "edits"),
                     "--source", "a photo of a cat", "--target-prompts", str(root / "targets"),
                     "--masks", str(root / "masks"), "--weights", str(weights_dir), "--output", str(out),
                     "--batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    assert (result["pairs"], result["originals_without_edit"]) == (3, 1)
    stems = ["a", "b", "c"]
    originals = [read(s, root / "originals") for s in stems]
    edits = [read(s, root / "edits") for s in stems]

    # CLIP: transformers' CLIPModel on CLIPImageProcessor's input (evaluate.clip_input, tested in test_evaluate).
    targets = [(root / "targets" / f"{s}.txt").read_text() for s in stems]
    ids = tokenizer(targets + ["a photo of a cat"] * 3, padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    pixels = torch.from_numpy(np.stack([evaluate.clip_input(e, 16) for e in edits]).transpose(0, 3, 1, 2))
    with torch.no_grad():
        image = F.normalize(getattr(o := clip.get_image_features(pixel_values=pixels), "pooler_output", o), dim=-1)
        text = F.normalize(getattr(o := clip.get_text_features(input_ids=ids), "pooler_output", o), dim=-1)
    to_target, to_source = (image * text[:3]).sum(-1).numpy(), (image * text[3:]).sum(-1).numpy()
    for i, stem in enumerate(stems):
        assert result["per_image"][stem]["clip_accuracy"] == bool(to_target[i] > to_source[i])
        assert result["per_image"][stem]["clip_score"] == pytest.approx(100 * to_target[i], rel=1e-4, abs=1e-4)
    assert result["metrics"]["clip_accuracy"]["value"] == pytest.approx(np.mean(to_target > to_source))
    assert result["metrics"]["clip_score"]["value"] == pytest.approx(max(100 * to_target.mean(), 0), rel=1e-4,
                                                                      abs=1e-4)

    # Background LPIPS: foreground blacked out in both images, then lpips on [-1, 1].
    masked = []
    for stem, original, edit in zip(stems, originals, edits):
        foreground = read(stem, root / "masks").mean(-1) >= 128
        masked.append([np.where(foreground[..., None], 0, x).astype(np.float32) / 127.5 - 1 for x in (original, edit)])
    a, b = (np.stack([m[k] for m in masked]).transpose(0, 3, 1, 2) for k in (0, 1))
    lpips = torch_lpips(features, heads, "alex", a, b)
    assert rel_error([result["per_image"][s]["background_lpips"] for s in stems], lpips) <= 1e-4

    # Structure: Pillow bilinear to the ViT's size, ImageNet normalisation, Splice's self-similarity MSE.
    def dino_pixels(x):
        resized = np.asarray(Image.fromarray(x).resize((16, 16), Image.Resampling.BILINEAR), np.float32) / 255
        return ((resized - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)[None]

    for stem, original, edit in zip(stems, originals, edits):
        sims = [splice_self_similarity(torch_keys(dino, weights_dir / "dino-vitb8", dino_pixels(x))[0])
                for x in (original, edit)]
        assert result["per_image"][stem]["structure_distance"] == pytest.approx(F.mse_loss(*sims).item(), rel=1e-4)
    assert list(result["metrics"]) == ["clip_accuracy", "clip_score", "background_lpips", "structure_distance"]


def test_evaluate_edits_errors(edit_weights, edit_folders, tmp_path, capsys, empty_hf_cache):
    weights_dir = edit_weights[0]
    root = edit_folders
    base = ["evaluate-edits", "--originals", str(root / "originals"), "--output", str(tmp_path / "out.json")]
    # An edit without its original.
    (tmp_path / "edits").mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(root / "edits" / name, tmp_path / "edits" / name)
    shutil.copy(root / "edits" / "a.png", tmp_path / "edits" / "zebra.png")
    assert cli.main(base + ["--edits", str(tmp_path / "edits"), "--weights", str(weights_dir),
                            "--metrics", "structure_distance"]) == 2
    assert "no original for edit 'zebra'" in capsys.readouterr().err
    edits = ["--edits", str(root / "edits")]
    # A missing network names the command that makes it.
    assert cli.main(base + edits + ["--weights", str(tmp_path), "--metrics", "background_lpips"]) == 2
    assert "nsync-jax convert-weights lpips-alex" in capsys.readouterr().err
    assert cli.main(base + edits + ["--weights", str(tmp_path), "--metrics", "structure_distance"]) == 2
    assert "nsync-jax convert-weights dino-vit" in capsys.readouterr().err
    # CLIP accuracy without a source text; an unknown metric.
    assert cli.main(base + edits + ["--weights", str(weights_dir), "--target", "a dog",
                                    "--metrics", "clip_accuracy"]) == 2
    assert "--source" in capsys.readouterr().err
    assert cli.main(base + edits + ["--weights", str(weights_dir), "--metrics", "psnr"]) == 2
    assert "unknown metric 'psnr'" in capsys.readouterr().err
    # An input no requested metric reads.
    assert cli.main(base + edits + ["--weights", str(weights_dir), "--masks", str(root / "masks"),
                                    "--metrics", "structure_distance"]) == 2
    assert "--masks: not used by --metrics structure_distance" in capsys.readouterr().err
    # An edit of another size than its original.
    (tmp_path / "small").mkdir()
    for stem in ("a", "b"):
        Image.open(root / "edits" / f"{stem}.png").resize((32, 32)).save(tmp_path / "small" / f"{stem}.png")
    assert cli.main(base + ["--edits", str(tmp_path / "small"), "--weights", str(weights_dir),
                            "--metrics", "background_lpips"]) == 2
    assert "edit 'a' is 32x32, its original 64x64" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_toyworld_benchmark_metrics_read_rendered_edits_as_untouched_backgrounds(edit_weights):
    """On the toy-world editing benchmark's ground truth: the input scores no change at all, and a render of the
    edited scene no background change outside the edit region, but a structure change."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_edit_toyworld as bench
    from nsync_jax.toyworld import world

    edits = bench.sample_edits(0, 2, 1, "flat")
    inputs = world.render_batch([e.scene for e in edits])
    outputs = {"input": inputs, "rendered": world.render_batch([e.edited_scene for e in edits])}
    values = bench.pix2pix_zero_metrics(edit_weights[0], edits, inputs, outputs, batch_size=2)
    assert list(values["input"]) == list(bench.edit_metrics.EDIT_METRICS)
    assert np.allclose(values["input"]["background_lpips"], 0, atol=1e-6)
    assert np.allclose(values["input"]["structure_distance"], 0, atol=1e-9)
    assert np.allclose(values["rendered"]["background_lpips"], 0, atol=1e-6)
    assert (values["rendered"]["structure_distance"] > 1e-6).all()
    lines = bench.metrics_table(values, edits)
    assert len(lines) == 2 + 2 * 2 and lines[2].startswith("| input | 2 colour |")
