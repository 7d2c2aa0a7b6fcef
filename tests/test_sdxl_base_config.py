"""SDXL base's real configurations (nsync_jax/architectures/sdxl-base: the 2.6 B UNet, CLIP ViT-L, OpenCLIP bigG
with its projection, the SDXL VAE, both 49408-token tokenizers) with random weights, at 64 x 64 px (8 x 8 latents):
the folder loads, one guided sampling step and one NSYNC step run (issue 34)."""
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from nsync_jax import tokens
from nsync_jax.config import load_config
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sampling import SampleSettings, generate
from nsync_jax.sdxl import StableDiffusionXL
from nsync_jax.train import trainer
from sdxl_fixtures import build_random_sdxl_base

NSYNC_SDXL = Path(__file__).resolve().parents[1] / "configs" / "nsync_sdxl.py"
SIZE = 64


# XLA:CPU computes bfloat16 dots and convolutions in float32, converting each weight first. Its default
# (concurrency-optimized) scheduler runs every convert before the first layer, its hoisting of loop invariants
# takes them out of the sampling loop, and common-subexpression elimination merges the forward pass's convert of
# a weight with the backward pass's, keeping it alive in between: 10 GB of float32 UNet copies next to the 5 GB of
# bfloat16 weights (sampling peaked at 17.9 GB; the NSYNC step's plan had 12.7 GiB of temporaries, 0.49 GiB
# without them, benchmarks/sdxl_memory.py --resolution 64 --dtype bfloat16). Numpy's large arrays are mapped on
# their own, so freed ones go back to the system: the float16 state dicts read while loading left 3 GB of heap.
CPU_ENVIRONMENT = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=false "
                                "--xla_disable_hlo_passes=while-loop-invariant-code-motion,cse",
                   "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def apart(function, *args):
    """`function(*args)` in a fresh process, started with CPU_ENVIRONMENT (this process's backend is already
    configured): each stage's peak memory (loading holds a part's float16 state dict next to the bfloat16
    model: 11.4 GB) goes back to the system when it ends."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def sample_one_step(folder: Path) -> np.ndarray:
    pipe = load_pipeline(folder, allow_sdxl=True, dtype=jnp.bfloat16)
    assert isinstance(pipe, StableDiffusionXL)
    assert pipe.unet.config.cross_attention_dim == 2048 and len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408
    settings = SampleSettings(steps=1, guidance=5.0, height=SIZE, width=SIZE, batch_size=1)
    return generate(pipe, ["a red star"], negative_prompt="a blue circle", settings=settings, progress=False)


def train_rows(config, workdir: Path) -> trainer.TrainResult:
    return trainer.train(config, workdir, progress=False)  # a nonfinite loss or gradient stops the run


def initial_rows(folder: Path, part: str, word: str) -> np.ndarray:
    """The row of `word` in `part`'s embedding table as the bfloat16 run starts from it, float32 `(1, width)`."""
    tokenizer = tokens.load_tokenizer(folder / part.replace("text_encoder", "tokenizer"))
    with safe_open(str(folder / part / "model.safetensors"), framework="numpy") as f:
        # "text_model." leads the key in CLIPTextModelWithProjection's file, not in CLIPTextModel's (transformers 5)
        (key,) = (key for key in f.keys() if key.endswith("embeddings.token_embedding.weight"))
        table = f.get_tensor(key)
    return np.asarray(jnp.asarray(tokens.initial_rows(table, tokenizer, word, 1), jnp.bfloat16), np.float32)


# Measured on 2 shared CPU cores (/usr/bin/time -v on pytest, its child processes included): 6 min 5 s wall
# (building the float16 folder, 6.5 GB on disk, about 35 s; loading and one guided step about 1.5 min; loading,
# compiling and one NSYNC step about 3.7 min), 11.4 GiB peak RSS (loading the model in bfloat16, 7 GB).
@pytest.mark.slow
def test_real_sdxl_base_configs_sample_and_train_one_nsync_step(tmp_path, style_dir, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {CPU_ENVIRONMENT['XLA_FLAGS']}".strip())
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", CPU_ENVIRONMENT["MALLOC_MMAP_THRESHOLD_"])
    folder = tmp_path / "sdxl-base"
    apart(build_random_sdxl_base, folder)

    images = apart(sample_one_step, folder)
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()

    # configs/nsync_sdxl.py (bf16, remat, the released variant with one projection per encoder) on the tests'
    # style data (positives, negatives, captions), one triple at 64 px, one step.
    config = load_config(NSYNC_SDXL)
    config.model = str(folder)
    config.data.images, config.data.captions, config.data.negatives = (str(style_dir / sub) for sub in
                                                                        ("images", "captions", "negatives"))
    config.train.steps, config.train.batch_size, config.data.resolution = 1, 1, SIZE
    result = apart(train_rows, config, tmp_path / "work")
    assert result.step == 1
    for part, width in (("text_encoder", 768), ("text_encoder_2", 1280)):
        rows = result.trained[part]
        assert rows.shape == (1, width) and np.isfinite(rows).all()
        # AdamW's first step moves each element by at most the learning rate (and decays it by lr * 1e-2).
        moved = np.abs(rows - initial_rows(folder, part, config.initializer_token)).max()
        assert 0 < moved <= 1.5 * config.train.learning_rate, (part, moved)
