"""NSYNC-LoRA on SD 1.5: NSYNC's projected gradient on LoRA adapters of the UNet's attention projections
instead of a token (the paper's LoRA variant; its rank, targets and learning rate are not published, so these
are common LoRA settings). No token is added: "zwx" is a rare existing word used as plain text in the
prompts ("<caption> in the style of zwx"), as DreamBooth/StyleForge do.

  nsync-jax train --config configs/nsync_lora_sd15.py --workdir runs/monet-lora \
      --config.model=stable-diffusion-v1-5 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions --config.data.negatives=monet2photo/negatives
  nsync-jax export --workdir runs/monet-lora --format diffusers-lora --output monet-lora.safetensors
  nsync-jax sample --model stable-diffusion-v1-5 --lora monet-lora.safetensors \
      --prompt "a harbour at dawn in the style of zwx" --output samples/

The run also writes WORKDIR/lora.safetensors at the end (diffusers' `pipe.load_lora_weights` reads it).
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
    config.data.resolution = 512
    config.train.steps = 2000
    config.train.batch_size = 2
    config.train.learning_rate = 1e-4
    config.train.scale_lr = False
    config.train.weight_decay = 1e-2
    config.checkpoint.every_steps = 500
    return config
