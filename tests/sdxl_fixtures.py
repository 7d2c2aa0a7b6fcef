"""A tiny random Stable Diffusion XL built with diffusers/transformers (torch, CPU) and saved with `save_pretrained`.

Its shape keeps what sets SDXL apart from SD 1.x/2.x: a plain first down block, `transformer_layers_per_block`
> 1, per-block heads, linear projections, `addition_embed_type="text_time"`, two text encoders of different
widths (the second with a projection of yet another width, so that a transposed or swapped weight shows), a
second tokenizer padding with "!" (OpenCLIP's pad token, id 0 in the real vocabulary) and the SDXL VAE's
`scaling_factor` and `force_upcast`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SD_SCHEDULE, TINY_VAE, _randomize

TEXT_ENCODER_1 = dict(hidden_size=24, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                      hidden_act="quick_gelu")
TEXT_ENCODER_2 = dict(hidden_size=40, intermediate_size=53, num_attention_heads=4, num_hidden_layers=3,
                      hidden_act="gelu", projection_dim=28)
ADDITION_TIME_EMBED_DIM = 8
SDXL_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=8, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
    cross_attention_dim=TEXT_ENCODER_1["hidden_size"] + TEXT_ENCODER_2["hidden_size"],
    addition_embed_type="text_time", addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
    # The pooled, projected text embedding of encoder 2, then 6 time ids of ADDITION_TIME_EMBED_DIM features each.
    projection_class_embeddings_input_dim=TEXT_ENCODER_2["projection_dim"] + 6 * ADDITION_TIME_EMBED_DIM,
)
SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)


def text_encoder_config(tokenizer, **fields):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **fields)


def build_tiny_sdxl(folder: Path, tokenizer_dir: Path) -> Path:
    """Saves a random diffusers `StableDiffusionXLPipeline` (Euler scheduler, as SDXL base) under `folder`."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(2)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, **TEXT_ENCODER_1)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(tokenizer_2, **TEXT_ENCODER_2)).eval()
    unet = UNet2DConditionModel(**SDXL_UNET).eval()
    vae = AutoencoderKL(**SDXL_VAE).eval()
    for module in (text_encoder, text_encoder_2, unet, vae):
        _randomize(module)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"},
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    # transformers 5 saves only tokenizer.json; keep the BPE files too, as real SDXL folders have them.
    for part in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            (folder / part / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny SDXL folder, built once per session (import this fixture into a test module to use it)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"), tiny_tokenizer_dir)


def build_random_sdxl_base(folder: Path) -> Path:
    """Saves SDXL base's architecture with random weights under `folder`: the configs and CLIP tokenizers shipped
    in nsync_jax/architectures/sdxl-base (`single_file.shipped_config`: the real 49408-token vocabulary), each
    model part built in float16 and written before the next is built, so that no more than the UNet (2.6 B
    parameters, 5.2 GB) is held at once."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from nsync_jax.single_file import shipped_config

    shipped_config("sdxl-base", folder)
    parts = {"text_encoder": lambda path: CLIPTextModel(CLIPTextConfig.from_pretrained(path)),
             "text_encoder_2": lambda path: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(path)),
             "vae": lambda path: AutoencoderKL.from_config(AutoencoderKL.load_config(path)),
             "unet": lambda path: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path))}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # initialised in float16: a float32 UNet alone would be 10.4 GB
    try:
        for part, build in parts.items():
            module = build(folder / part)
            module.save_pretrained(folder / part)
            del module
    finally:
        torch.set_default_dtype(default)
    return folder
