"""Shared fixtures: tiny random Stable Diffusion parts built with diffusers/transformers (torch, CPU).

Nothing is downloaded. Each tiny model is saved with `save_pretrained` so the project's own loading code reads
it exactly as it would read a real checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsync_jax.config import load_config
from nsync_jax.tokens import write_clip_tokenizer

# The tests' models are tiny, so their time goes to XLA compiling steps: LLVM at optimisation level 0 compiles
# faster (three of the slowest tests: 108 s against 128 s) and changes no result beyond float rounding. Read when
# JAX first uses a device, so setting it when pytest configures, before any test runs, is in time; child processes
# inherit it. A hook, not import time: the benchmarks import this module's builders and must compile as users do.
def pytest_configure(config):
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # a level set by the caller wins
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


@pytest.fixture(scope="session", autouse=True)
def jax_devices_fixed():
    """JAX's backend started before any test: a command run in-process (`main(["demo", ...])`) cannot then
    split the CPU into its `cpu_devices` for the tests after it (the CLI leaves a started backend as it is)."""
    import jax

    return jax.devices()


# Words that get whole-word merges in the tiny vocabulary; every other text falls back to byte-level tokens.
TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "star", "circle", "painting", "in", "the", "style")


def write_tiny_tokenizer(folder: Path, model_max_length: int = 16) -> Path:
    """Writes a CLIP BPE tokenizer folder (vocab.json, merges.txt, configs) with a ~560-token vocabulary."""
    merges = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return write_clip_tokenizer(folder, list(dict.fromkeys(merges)), model_max_length)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _randomize(module, scale: float = 0.1) -> None:
    """Perturbs every parameter (norm scales and biases too) so that no layer is an identity by accident."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


# Tiny pipelines covering the two families. Block sizes are small but keep every structural feature:
# several resolutions, cross-attention blocks in both halves, a plain down/up block, and a mid block.
SD1_UNET = dict(block_out_channels=(8, 16, 16), layers_per_block=2, sample_size=8, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                norm_num_groups=4, attention_head_dim=2)
SD2_UNET = dict(SD1_UNET, layers_per_block=1, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                upcast_attention=True)
TINY_VAE = dict(block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4, layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                   set_alpha_to_one=False, steps_offset=1)


def build_tiny_pipeline(folder: Path, tokenizer_dir: Path, family: str, *, safe_serialization: bool = True) -> Path:
    """Saves a random diffusers `StableDiffusionPipeline` of the SD-1.x ("sd1") or SD-2.x ("sd2") family."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0 if family == "sd1" else 1)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu" if family == "sd1" else "gelu")).eval()
    unet = UNet2DConditionModel(**(SD1_UNET if family == "sd1" else SD2_UNET)).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    for module in (text_encoder, unet, vae):
        _randomize(module)
    if family == "sd1":
        scheduler = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True)
    else:
        scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization)
    # transformers 5 saves only tokenizer.json; keep the BPE files too, as real SD folders have them.
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


@pytest.fixture(scope="session")
def sd1_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd1"), tiny_tokenizer_dir, "sd1")


@pytest.fixture(scope="session")
def sd2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd2"), tiny_tokenizer_dir, "sd2")


@pytest.fixture(scope="session")
def sd1_bin_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The SD-1.x pipeline saved as PyTorch `.bin` files."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd1_bin"), tiny_tokenizer_dir, "sd1",
                               safe_serialization=False)


def jitted(module, method: str = "__call__"):
    """`module.method` compiled once, with the parameters as jit arguments (eager NNX dispatch is slow)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
    return lambda *args: fn(state, *args)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A JAX compilation cache for the session: every training run builds its step function anew, so a resumed
    run or a second test on the same tiny model would otherwise compile the same program again."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ------------------------------------------------------------------------------------------------------------
# Training tests: a tiny style dataset and the tiny config.
# ------------------------------------------------------------------------------------------------------------

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def write_style_dataset(root: Path, count: int = 4) -> Path:
    """`count` striped positives, flat negatives and captions in NSYNC's layout under `root`."""
    rng = np.random.default_rng(0)
    for sub in ("images", "captions", "negatives"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        stripes = (np.indices((40, 48)).sum(0) // (2 + i) % 2)[..., None] * rng.integers(0, 255, 3)
        Image.fromarray(stripes.astype(np.uint8)).save(root / "images" / f"item{i}.png")
        flat = np.full((40, 48, 3), rng.integers(0, 255, 3), np.uint8)
        Image.fromarray(flat).save(root / "negatives" / f"item{i}.png")
        (root / "captions" / f"item{i}.txt").write_text(["a red star", "a blue circle", "a cat", "a dog"][i % 4])
    return root


@pytest.fixture(scope="session")
def style_dir(tmp_path_factory) -> Path:
    """The tiny style dataset, shared (read-only) by the training tests."""
    return write_style_dataset(tmp_path_factory.mktemp("style"))


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home (with its hub cache) under tmp_path, read offline: whatever a test asks of the
    Hub or of a release URL fails instead of being fetched. Returns the home."""
    import huggingface_hub

    home = tmp_path / "hf-home"
    # huggingface_hub reads the environment into `constants` when imported: set both.
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(home / "hub")), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, str(int(value)) if value is True else value)
        monkeypatch.setattr(huggingface_hub.constants, name, value)
    return home


def tiny_config(model, data, **overrides):
    """configs/tiny.py on `model` and the dataset at `data`; `a__b=value` overrides config key a.b."""
    config = load_config(CONFIG)
    config.model = str(model)
    config.data.images, config.data.captions, config.data.negatives = (str(data / s) for s in
                                                                        ("images", "captions", "negatives"))
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def assert_token_encodes_as_in_diffusers(pipe, reference, token_file: Path, prompt: str) -> None:
    """A learned-token file read by `pipe` (ours) and by diffusers' `reference.load_textual_inversion` gives the
    same ids and text-encoder states (relative error <= 1e-4)."""
    import torch

    from nsync_jax import tokens
    from nsync_jax.pipeline import encode_text

    pipe.add_embeddings(token_file)
    ids = tokens.tokenize(pipe.tokenizer, [tokens.expand_placeholders(prompt, pipe.tokenizer)])
    ours = np.asarray(encode_text(pipe.text_encoder, pipe.extra_token_rows, ids))
    reference.load_textual_inversion(str(token_file))
    text = reference.maybe_convert_prompt([prompt], reference.tokenizer)
    torch_ids = reference.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
    np.testing.assert_array_equal(torch_ids.numpy(), ids)
    with torch.no_grad():
        expected = reference.text_encoder(torch_ids).last_hidden_state.numpy()
    assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-4
