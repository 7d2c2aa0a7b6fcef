"""NSYNC on SDXL base with the released SDXL script's settings (giddyyupp/NSYNC f12f84f,
`src/contrastive_training_sdxl.py`, version v4.2): the token in both tokenizers, one row per text encoder, each
projected on its own (`granularity="leaf"`); bf16 compute with float32 rows, 1024 px squashed images (the VAE's
sample size) with time_ids (1024, 1024, 0, 0, 1024, 1024), lr 1e-6 unscaled, batch 4, 8000 steps, checkpoints
every 1000, gradient checkpointing (remat), seed 42. The released AdamW also decays the rest of both vocabularies
(weight_decay_scope "table"); at lr 1e-6 that is a factor of 0.9999 over the run, so the rows alone are decayed.

  nsync-jax train --config configs/nsync_sdxl.py --workdir runs/monet_sdxl \
      --config.model=stabilityai/stable-diffusion-xl-base-1.0 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions --config.data.negatives=monet2photo/negatives_sdxl
  nsync-jax export --workdir runs/monet_sdxl --output illustration-special.safetensors --format a1111
"""
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "nsync"
    config.nsync.variant = "released"  # v4.2
    config.nsync.granularity = "leaf"  # one projection per text encoder, as released
    config.placeholder_token = "<illustration-special>"
    config.initializer_token = "illustration"
    config.data.resolution = 1024
    config.train.dtype = "bfloat16"
    config.train.remat = True
    config.train.steps = 8000
    config.train.batch_size = 4
    config.train.learning_rate = 1e-6
    config.train.scale_lr = False
    config.train.seed = 42
    config.checkpoint.every_steps = 1000
    config.sample.scheduler = "euler"  # SDXL's default, for the preview grids
    return config
