"""NSYNC-LoRA on SDXL base: NSYNC's projected gradient on LoRA adapters of the UNet's attention projections (the
paper's LoRA variant, as configs/nsync_lora_sd15.py), with the released SDXL NSYNC script's settings where they
apply (giddyyupp/NSYNC f12f84f, `src/contrastive_training_sdxl.py`): bf16 compute with float32 adapters, 1024 px
squashed images (the VAE's sample size) with time_ids (1024, 1024, 0, 0, 1024, 1024), batch 4, gradient
checkpointing (remat), seed 42, Euler previews. Its learning rate (1e-6) is a token row's; the adapters take
common LoRA settings (rank 16, lr 1e-4, 2000 steps). No token is added: "zwx" is a rare existing word used as
plain text in the prompts ("<caption> in the style of zwx"). With lora.text_encoder set, both text encoders get
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
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "nsync"
    config.nsync.variant = "orthogonal_anchor"
    config.nsync.granularity = "global"  # one projection over all adapters, as the paper's single vector
    config.trainable = "lora"
    config.placeholder_token = "zwx"
    config.lora.rank = 16
    config.lora.alpha = 16.0
    config.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")
    config.lora.text_encoder = False
    config.data.resolution = 1024
    config.train.dtype = "bfloat16"
    config.train.remat = True
    config.train.steps = 2000
    config.train.batch_size = 4
    config.train.learning_rate = 1e-4
    config.train.scale_lr = False
    config.train.weight_decay = 1e-2
    config.train.seed = 42
    config.checkpoint.every_steps = 500
    config.sample.scheduler = "euler"  # SDXL's default, for the preview grids
    return config
