"""Textual Inversion baseline on SD 1.5 for the Monet style, as the NSYNC paper's baseline: batch 4,
lr 5e-4 scaled by the batch, 8000 steps, captions + " in the style of <token>", no negatives.

  nsync-jax train --config configs/ti_sd15_monet.py --workdir runs/monet_ti \
      --config.model=stable-diffusion-v1-5 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions
"""
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "textual_inversion"
    config.placeholder_token = "<illustration-special>"
    config.initializer_token = "painting"
    config.data.resolution = 512
    config.train.steps = 8000
    config.train.batch_size = 4
    config.train.learning_rate = 5e-4
    return config
