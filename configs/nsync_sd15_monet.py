"""NSYNC on SD 1.5 for the Monet style (CycleGAN monet2photo trainA), the paper's settings.

Positives: the Monet paintings; captions from a VLM (`nsync-jax caption`); negatives: each caption drawn by
SD 1.5 "in the style of painting" (`nsync-jax negatives`). lr 5e-4 scaled by the batch of 2 triples, 8000
steps, AdamW with weight decay 1e-2 on the token row only.

  nsync-jax train --config configs/nsync_sd15_monet.py --workdir runs/monet \
      --config.model=stable-diffusion-v1-5 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions --config.data.negatives=monet2photo/negatives
"""
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "nsync"
    config.nsync.variant = "orthogonal_anchor"  # "released" reproduces the released code's update
    config.placeholder_token = "<illustration-special>"
    config.initializer_token = "painting"
    config.data.resolution = 512
    config.train.steps = 8000
    config.train.batch_size = 2
    config.train.learning_rate = 5e-4
    config.checkpoint.every_steps = 1000
    return config
