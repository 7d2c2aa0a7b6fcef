"""Textual Inversion on SDXL base, the released baseline (giddyyupp/NSYNC f12f84f,
`src/sdxl_textual_inversion_training.py`): the NSYNC SDXL settings (configs/nsync_sdxl.py) without negatives:
rows for both text encoders, bf16, 1024 px squashed, lr 1e-6 unscaled, batch 4, 8000 steps, seed 42.

  nsync-jax train --config configs/ti_sdxl.py --workdir runs/monet_sdxl_ti \
      --config.model=stabilityai/stable-diffusion-xl-base-1.0 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions
"""
from configs import nsync_sdxl


def get_config():
    config = nsync_sdxl.get_config()
    config.method = "textual_inversion"
    return config
