"""The Stable Diffusion XL models and NSYNC step the SDXL benchmarks share (`sdxl_memory.py`, `sdxl_speed.py`).

Presets: `base` is SDXL base's architecture (the configs shipped in nsync_jax/architectures/sdxl-base: 2.6 B UNet,
CLIP ViT-L and OpenCLIP bigG text encoders, the SDXL VAE) with random weights and the tests' offline BPE
tokenizer (77 tokens; its ~560-word vocabulary sets both embedding tables' rows); `tiny` is the tests' tiny
SDXL (tests/sdxl_fixtures.py), for a CPU.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[1]
SDXL_BASE = REPO / "nsync_jax" / "architectures" / "sdxl-base"
sys.path.insert(0, str(REPO / "tests"))

PRESETS = ("tiny", "base")
# transformers config keys the random text encoders take from the tokenizer instead (sdxl_fixtures'
# text_encoder_config), or that only describe the saved file.
TOKENIZER_KEYS = {"vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                  "architectures", "torch_dtype", "transformers_version", "model_type", "_name_or_path"}


def build_sdxl(preset: str, work: Path) -> Path:
    """Saves a random diffusers `StableDiffusionXLPipeline` of `preset` as `work/model` and returns that folder;
    `base` in float16 (half the bytes to write and read; each benchmark casts to its own dtype), on the GPU when
    torch has one (random initialisation of 3.5 B parameters is minutes on a few CPU cores)."""
    from conftest import write_tiny_tokenizer
    from sdxl_fixtures import build_tiny_sdxl, text_encoder_config

    if preset == "tiny":
        return build_tiny_sdxl(work / "model", write_tiny_tokenizer(work / "_tokenizer"))
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer_dir = write_tiny_tokenizer(work / "_tokenizer", model_max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")  # as SDXL base's tokenizer_2
    read = lambda part: json.loads((SDXL_BASE / part / "config.json").read_text())
    text_fields = lambda part: {k: v for k, v in read(part).items() if k not in TOKENIZER_KEYS}
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        text_encoder = CLIPTextModel(text_encoder_config(tokenizer, **text_fields("text_encoder")))
        text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(tokenizer_2, **text_fields("text_encoder_2")))
        unet = UNet2DConditionModel.from_config(read("unet"))
        vae = AutoencoderKL.from_config(read("vae"))
    scheduler = EulerDiscreteScheduler.from_config(
        json.loads((SDXL_BASE / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.to(dtype=torch.float16).save_pretrained(work / "model")
    return work / "model"


def pipeline_folder(preset: str, work: Path) -> Path:
    """`work/model`, the random SDXL of `preset`: built there unless an earlier run left one of the same preset."""
    marker = work / "preset.txt"
    if not (marker.exists() and marker.read_text() == f"sdxl-{preset}"
            and (work / "model" / "model_index.json").exists()):
        work.mkdir(parents=True, exist_ok=True)
        build_sdxl(preset, work)
        marker.write_text(f"sdxl-{preset}")
    return work / "model"


def nsync_config(triples: int, resolution: int, *, dtype: str = "bfloat16", remat: bool | None = None):
    """configs/nsync_sdxl.py (the released SDXL script's settings) with `triples` per step at `resolution`;
    `remat` None keeps the config's."""
    spec = importlib.util.spec_from_file_location("nsync_sdxl", REPO / "configs" / "nsync_sdxl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.batch_size, config.data.resolution, config.train.dtype = triples, resolution, dtype
    if remat is not None:
        config.train.remat = remat
    return config


def sdxl_trainable(config):
    """`(method, trainable)` of `config` for an SDXL model, as `trainer.train` picks them."""
    from nsync_jax.train import methods, trainables

    method = methods.get(config.method)
    return method, trainables.get(config.trainable).configured(config).for_model(True, config, method)


def nsync_step(config, graphdefs, scheduler_config: dict, scaling_factor: float):
    """`(step, optimizer)`: the NSYNC step on SDXL token rows as `trainer.train` builds it, for the caller to jit
    (with the trainer's donation, and its shardings on a mesh)."""
    from nsync_jax.schedulers import NoiseSchedule
    from nsync_jax.train import trainer
    from nsync_jax.train.step import StepSpec, make_train_step

    method, trainable = sdxl_trainable(config)
    spec = StepSpec(graphdefs, NoiseSchedule.from_config(scheduler_config), scaling_factor,
                    jnp.dtype(config.train.dtype), config.clip_skip, remat=config.train.remat,
                    max_timestep=config.train.max_timestep, trainable=trainable,
                    time_ids=trainer.training_time_ids(config))
    tx = trainer.make_optimizer(config, method)
    step = make_train_step(method.gradients(spec, config), tx, norm_metric=trainable.norm_metric,
                           skip_nonfinite=config.train.nonfinite == "skip",
                           grad_accum_steps=config.train.grad_accum_steps)
    return step, tx
