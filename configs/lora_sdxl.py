"""NSYNC-LoRA on SDXL base: configs/nsync_lora_sd15.py (NSYNC's projected gradient on LoRA adapters of the UNet's
attention projections, the paper's LoRA variant: rank 16, lr 1e-4, 2000 steps) with the released SDXL NSYNC
script's settings where they apply (giddyyupp/NSYNC f12f84f, `src/contrastive_training_sdxl.py`, as
configs/nsync_sdxl.py): bf16 compute with float32 adapters, 1024 px squashed images (the VAE's sample size) with
time_ids (1024, 1024, 0, 0, 1024, 1024), batch 4, gradient checkpointing (remat), seed 42, Euler previews; its
learning rate (1e-6) and steps are a token row's. No token is added: "zwx" is a rare existing word used as plain
text in the prompts ("<caption> in the style of zwx"). With lora.text_encoder set, both text encoders get
adapters too.

  nsync-jax train --config configs/lora_sdxl.py --workdir runs/monet-lora-sdxl \
      --config.model=stabilityai/stable-diffusion-xl-base-1.0 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions --config.data.negatives=monet2photo/negatives_sdxl
  nsync-jax export --workdir runs/monet-lora-sdxl --format a1111-lora --output monet-lora-sdxl.safetensors
  nsync-jax sample --model stabilityai/stable-diffusion-xl-base-1.0 --lora monet-lora-sdxl.safetensors \
      --prompt "a harbour at dawn in the style of zwx" --output samples/

The run also writes WORKDIR/lora.safetensors in diffusers' layout (`StableDiffusionXLPipeline.load_lora_weights`
reads it); `--format a1111-lora` writes kohya's SDXL keys, which A1111 and ComfyUI read.
"""
from configs import nsync_lora_sd15, nsync_sdxl

# What configs/nsync_sdxl.py takes from the released SDXL script that applies to adapters as well as to token rows.
RELEASED_SDXL_SETTINGS = (("data", "resolution"), ("train", "dtype"), ("train", "remat"), ("train", "batch_size"),
                          ("train", "seed"), ("sample", "scheduler"))


def get_config():
    config = nsync_lora_sd15.get_config()
    released = nsync_sdxl.get_config()
    for section, key in RELEASED_SDXL_SETTINGS:
        config[section][key] = released[section][key]
    return config
