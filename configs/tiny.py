"""A few NSYNC steps on a tiny model and dataset: what the tests run. The model and data paths are given by
the caller.

  nsync-jax train --config configs/tiny.py --workdir /tmp/tiny --config.model=DIR \
      --config.data.images=DIR/images --config.data.captions=DIR/captions --config.data.negatives=DIR/negatives
"""
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "nsync"
    config.num_vectors = 2
    config.placeholder_token = "<tiny-style>"
    config.initializer_token = "painting"
    config.data.resolution = 32
    config.train.steps = 6
    config.train.batch_size = 2
    config.train.learning_rate = 1e-2
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 3
    return config
