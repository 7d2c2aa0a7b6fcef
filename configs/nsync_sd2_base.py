"""NSYNC on SD 2 base (512 px, epsilon prediction) with the paper's settings; the style is given on the
command line.

  nsync-jax train --config configs/nsync_sd2_base.py --workdir runs/vangogh_sd2 \
      --config.model=stable-diffusion-2-base --config.data.images=vangogh2photo/trainA \
      --config.data.captions=vangogh2photo/captions --config.data.negatives=vangogh2photo/negatives
"""
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "nsync"
    config.placeholder_token = "<illustration-special>"
    config.initializer_token = "painting"
    config.data.resolution = 512
    config.train.steps = 8000
    config.train.batch_size = 2
    config.train.learning_rate = 5e-4
    return config
