"""The Flax CLIP image tower, CLIPModel and CSD style model against transformers and OpenAI's code (tiny, random),
their converters and their load errors."""
import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import CLIPConfig as TorchCLIPConfig
from transformers import CLIPModel as TorchCLIPModel
from transformers import CLIPVisionConfig as TorchCLIPVisionConfig
from transformers import CLIPVisionModelWithProjection as TorchCLIPVisionModelWithProjection

from conftest import _randomize
from nsync_jax.convert import convert_csd, convert_openai_clip, openai_to_transformers
from nsync_jax.errors import UserError
from nsync_jax.models.clip_text import CLIPTextConfig
from nsync_jax.models.clip_vision import (STYLE_KEY, CLIPConfig, CLIPVisionConfig, load_clip_model, load_clip_vision,
                                          load_csd)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

FIXTURE = Path(__file__).parent / "fixtures" / "openai_clip_tiny.npz"  # see make_openai_clip_fixture.py
# Image and text towers of different widths, so that a tower or projection mixed up fails on shapes.
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
              image_size=16)
TEXT = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
            max_position_embeddings=12, bos_token_id=97, eos_token_id=60, pad_token_id=1)


def run(model, method, *args):
    """`model.method(*args)` compiled, with the parameters as jit arguments (eager NNX dispatch is slow)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
    return jax.tree.map(np.asarray, fn(state, *map(jnp.asarray, args)))


def rel_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float32)
    return float(np.abs(np.asarray(ours, np.float32) - reference).max() / np.abs(reference).max())


def nhwc(pixels_nchw) -> np.ndarray:
    return np.asarray(pixels_nchw).transpose(0, 2, 3, 1)


def features(output) -> np.ndarray:
    """`get_*_features` return a tensor in transformers 4 and an output object (projection as pooler) in 5."""
    return getattr(output, "pooler_output", output).numpy()


@pytest.fixture(scope="module")
def pixels():
    return torch.from_numpy(np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32))


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchCLIPVisionModelWithProjection(TorchCLIPVisionConfig(**VISION, projection_dim=24)).eval()
    _randomize(model)
    folder = tmp_path_factory.mktemp("clip_vision")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(1)
    model = TorchCLIPModel(TorchCLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)).eval()
    _randomize(model)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(FIXTURE))


def openai_state(fixture, prefix="visual."):
    return {prefix + k.removeprefix("visual."): v for k, v in fixture.items() if k.startswith("visual.")}


def test_vision_matches_transformers(vision, pixels):
    torch_model, folder = vision
    with torch.no_grad():
        out = torch_model(pixel_values=pixels)
        reference_pooled = torch_model.vision_model.post_layernorm(out.last_hidden_state[:, 0]).numpy()
    model = load_clip_vision(folder)
    assert model.config == CLIPVisionConfig(**VISION, projection_dim=24)
    pooled, image_embeds = run(model, "__call__", nhwc(pixels))
    assert image_embeds.shape == (3, 24)
    assert rel_error(pooled, reference_pooled) <= 1e-4
    assert rel_error(image_embeds, out.image_embeds.numpy()) <= 1e-4


def test_clip_model_matches_transformers(clip, pixels):
    torch_model, folder = clip
    # Words above the end-of-text id, so that pooling at the largest id (transformers' legacy rule) would differ.
    ids = np.random.default_rng(1).integers(61, 97, (3, 12))
    ids[:, 0] = 97
    ids[0, 5], ids[1, 11], ids[2, 3] = 60, 60, 60  # end-of-text, with padding after it in rows 0 and 2
    ids[0, 6:], ids[2, 4:] = 1, 1
    with torch.no_grad():
        reference_image = features(torch_model.get_image_features(pixel_values=pixels))
        reference_text = features(torch_model.get_text_features(input_ids=torch.from_numpy(ids)))
    model = load_clip_model(folder)
    assert model.config.projection_dim == 16 and model.config.text.eos_token_id == 60
    image, text = run(model, "image_features", nhwc(pixels)), run(model, "text_features", ids)
    assert image.shape == text.shape == (3, 16)
    assert rel_error(image, reference_image) <= 1e-4
    assert rel_error(text, reference_text) <= 1e-4
    # The image tower alone, from the same CLIPModel folder.
    assert rel_error(run(load_clip_vision(folder), "__call__", nhwc(pixels)).image_embeds, reference_image) <= 1e-4


def matrix_products(jaxpr):
    """The dot_general and conv_general_dilated equations of a jaxpr, nested calls included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from matrix_products(sub)


def test_full_precision_products(clip, pixels):
    """Every matrix product and convolution at Precision.HIGHEST (GPUs/TPUs default to TF32/bf16)."""
    graphdef, state = nnx.split(load_clip_model(clip[1]))
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for method, x in (("image_features", nhwc(pixels)), ("text_features", np.ones((1, 12), np.int32))):
        jaxpr = jax.make_jaxpr(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x))(state, x).jaxpr
        precisions = [eqn.params["precision"] for eqn in matrix_products(jaxpr)]
        assert len(precisions) >= 10 and all(p == highest for p in precisions), precisions


def torchscript_file(state: dict[str, np.ndarray], path: Path) -> Path:
    """A TorchScript archive whose state dict is `state`, as OpenAI's `ViT-*.pt` files are."""
    root = torch.nn.Module()
    for key, array in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, torch.from_numpy(np.asarray(array)))
    torch.jit.save(torch.jit.script(root), str(path))
    return path


def test_openai_layout_matches_openai_code(fixture, tmp_path):
    # OpenAI's file holds the text tower and three integers beside the image tower: they are left out.
    extra = {"positional_embedding": np.zeros((7, 8), np.float16), "transformer.resblocks.0.ln_1.weight":
             np.ones(8, np.float16), "text_projection": np.zeros((8, 4), np.float16),
             "input_resolution": np.array(16)}
    src = torchscript_file({**openai_state(fixture), **extra}, tmp_path / "ViT-tiny.pt")
    folder = convert_openai_clip(src, tmp_path / "converted")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == 1 and config["image_size"] == 16 and config["projection_dim"] == 32
    assert load_file(folder / "model.safetensors")["visual_projection.weight"].dtype == np.float16
    pooled, image_embeds = run(load_clip_vision(folder), "__call__", nhwc(fixture["pixels"]))
    assert rel_error(pooled, fixture["pooled"]) <= 1e-4
    assert rel_error(image_embeds, fixture["image_embeds"]) <= 1e-4
    # The folder is transformers' layout: transformers computes the same.
    torch_model = TorchCLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch_model(pixel_values=torch.from_numpy(fixture["pixels"])).image_embeds.numpy()
    assert rel_error(reference, fixture["image_embeds"]) <= 1e-4
    # A plain state dict of the same keys converts to the same files.
    torch.save({k: torch.from_numpy(v) for k, v in openai_state(fixture).items()}, tmp_path / "plain.pt")
    plain = convert_openai_clip(tmp_path / "plain.pt", tmp_path / "plain")
    assert (plain / "config.json").read_text() == (folder / "config.json").read_text()
    converted = load_file(folder / "model.safetensors")
    assert all(np.array_equal(v, converted[k]) for k, v in load_file(plain / "model.safetensors").items())


def csd_checkpoint(fixture, path: Path, prefix: str = "module.") -> Path:
    """A checkpoint as CSD's `train_csd.py` saves it (a DDP model's state dict, optimizer state, argparse args)."""
    state = {k: torch.from_numpy(v.astype(np.float32))
             for k, v in openai_state(fixture, f"{prefix}backbone.").items() if not k.endswith(".proj")}
    state[f"{prefix}last_layer_style"] = torch.from_numpy(fixture["style_matrix"])
    state[f"{prefix}last_layer_content"] = torch.randn(64, 32)
    torch.save({"model_state_dict": state, "opt_bb": {"state": {}}, "iter": 3,
                "args": argparse.Namespace(arch="vit_large", lr=0.003)}, path)
    return path


def test_convert_weights_command_writes_what_evaluate_loads(fixture, tmp_path, capsys):
    from nsync_jax.cli import main

    src = torchscript_file(openai_state(fixture), tmp_path / "ViT-tiny.pt")
    assert main(["convert-weights", "openai-clip", str(src), str(tmp_path / "clip")]) == 0
    assert f"wrote {tmp_path / 'clip'}" in capsys.readouterr().out
    load_clip_vision(tmp_path / "clip")
    checkpoint = csd_checkpoint(fixture, tmp_path / "checkpoint.pth")
    assert main(["convert-weights", "csd", str(checkpoint), str(tmp_path / "csd")]) == 0
    load_csd(tmp_path / "csd")
    assert main(["convert-weights", "csd", str(checkpoint), str(tmp_path / "csd")]) == 2
    assert f"{tmp_path / 'csd'}: already exists" in capsys.readouterr().err


def test_csd_matches_direct_computation(fixture, tmp_path):
    folder = convert_csd(csd_checkpoint(fixture, tmp_path / "checkpoint.pth"), tmp_path / "csd")
    assert np.array_equal(load_file(folder / "model.safetensors")[STYLE_KEY], fixture["style_matrix"].T)
    style = run(load_csd(folder), "__call__", nhwc(fixture["pixels"]))
    assert rel_error(style, fixture["style_embeds"]) <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(style, axis=-1), 1, rtol=1e-6)


# --------------------------------------------------------------------------------------------- errors

def test_unsupported_vision_config(vision, tmp_path):
    folder = vision[1]
    for key, value in [("vision_feature_layer", -2), ("image_size", [16, 16]), ("hidden_act", "relu"),
                       ("num_attention_heads", 5), ("architectures", ["CLIPModel"]), ("pruned_heads", {"0": [1]})]:
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (tmp_path / "config.json").write_text(json.dumps(config))
        (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        with pytest.raises(UserError, match=f"{tmp_path / 'config.json'}: config.*{key}"):
            load_clip_vision(tmp_path)


def test_unsupported_clip_config(clip, tmp_path):
    config = json.loads((clip[1] / "config.json").read_text())
    config["vision_config"]["use_flash"] = True
    with pytest.raises(UserError, match="clip.json: vision_config: config key 'use_flash'"):
        CLIPConfig.from_dict(config, "clip.json")


# openai/clip-vit-large-patch14's config.json (transformers 4.16): every generic key of transformers 4, and
# legacy `*_config_dict`s that override the sub-configs, completed with the defaults (eos_token_id too).
GENERIC_4X = {
    "add_cross_attention": False, "architectures": None, "bad_words_ids": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None, "diversity_penalty": 0.0,
    "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None,
    "torchscript": False, "typical_p": 1.0, "use_bfloat16": False, "attention_dropout": 0.0, "dropout": 0.0,
    "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05, "hidden_act": "quick_gelu",
}
CLIP_L14_CONFIG = {
    "_name_or_path": "clip-vit-large-patch14/", "architectures": ["CLIPModel"], "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": None,
    "text_config": {**GENERIC_4X, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_size": 768,
                    "intermediate_size": 3072, "max_position_embeddings": 77, "model_type": "clip_text_model",
                    "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
                    "vocab_size": 49408, "transformers_version": "4.16.0.dev0"},
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "projection_dim": 768},
    "vision_config": {**GENERIC_4X, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                      "hidden_size": 1024, "image_size": 224, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_channels": 3,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                      "transformers_version": "4.16.0.dev0"},
    "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}


def test_released_clip_config_parses():
    ours = CLIPConfig.from_dict(CLIP_L14_CONFIG)
    assert ours == CLIPConfig(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, eos_token_id=49407),
        CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                         patch_size=14, projection_dim=768),
        projection_dim=768)
    theirs = TorchCLIPConfig(**CLIP_L14_CONFIG)  # transformers reads the same numbers
    assert theirs.text_config.eos_token_id == 49407 and theirs.vision_config.patch_size == 14


def test_openai_converter_errors(fixture, tmp_path):
    state = openai_state(fixture)
    with pytest.raises(UserError, match="ViT.pt: missing weight 'visual.proj'"):
        openai_to_transformers({k: v for k, v in state.items() if k != "visual.proj"}, source="ViT.pt")
    with pytest.raises(UserError, match="ViT.pt: unexpected weight 'visual.transformer.resblocks.0.attn.extra'"):
        openai_to_transformers({**state, "visual.transformer.resblocks.0.attn.extra": np.zeros(1)}, source="ViT.pt")
    with pytest.raises(UserError, match=r"ViT.pt: image tower layers \[0, 9\] are not numbered 0 to n-1"):
        openai_to_transformers({k.replace("resblocks.1.", "resblocks.9."): v for k, v in state.items()},
                               source="ViT.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=f"{tmp_path / 'bad.pt'}: cannot read PyTorch file"):
        convert_openai_clip(tmp_path / "bad.pt", tmp_path / "out")
    with pytest.raises(UserError, match=f"{tmp_path / 'missing.pt'}: file not found"):
        convert_openai_clip(tmp_path / "missing.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_csd_converter_errors(fixture, tmp_path):
    src = csd_checkpoint(fixture, tmp_path / "checkpoint.pth", prefix="")  # without DDP's `module.`
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'taken'}: already exists"):
        convert_csd(src, tmp_path / "taken")
    raw = torch.load(src, weights_only=False)
    raw["model_state_dict"]["backbone.proj"] = torch.zeros(64, 32)
    torch.save(raw, tmp_path / "with_proj.pth")
    with pytest.raises(UserError, match="with_proj.pth: unexpected weight 'backbone.proj'"):
        convert_csd(tmp_path / "with_proj.pth", tmp_path / "out")
    del raw["model_state_dict"]["last_layer_style"]
    torch.save(raw, tmp_path / "no_style.pth")
    with pytest.raises(UserError, match="no_style.pth: missing weight 'last_layer_style'"):
        convert_csd(tmp_path / "no_style.pth", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "no_style.pth", "taken",
                                                          "with_proj.pth"]


def test_wrong_image_size(vision):
    with pytest.raises(ValueError, match=r"image tower takes \(batch, 16, 16, 3\)"):
        load_clip_vision(vision[1])(jnp.zeros((1, 3, 16, 16)))
