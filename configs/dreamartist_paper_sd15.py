"""DreamArtist on SD 1.5 with the paper-era stand-alone code's defaults (IrisRainbowNeko/DreamArtist-stable-
diffusion, 2022-11): one vector for the positive word and one for the negative `<token>-neg`, training gamma 5,
lr 5e-3, batch 1, no reconstruction, no EMA. The stand-alone UI runs up to 100,000 steps and is stopped by
hand; the authors' recipes use 1,000-15,000, so this config stops at 8000 like the extension's.

  nsync-jax train --config configs/dreamartist_paper_sd15.py --workdir runs/monet_da_paper \
      --config.model=stable-diffusion-v1-5 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions
"""
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "dreamartist"
    config.placeholder_token = "<illustration-special>"
    config.initializer_token = "*"
    config.num_vectors = 1
    config.dreamartist.num_negative_vectors = 1
    config.dreamartist.guidance = 5.0
    config.dreamartist.reconstruction = False
    config.data.resolution = 512
    # The released preprocessing: a centre square (bicubic), no mirroring, one latent per image for the run.
    config.data.resize, config.data.flip, config.data.latent_sample = "center_crop", False, "once"
    config.train.steps = 8000
    config.train.batch_size = 1
    config.train.learning_rate = 5e-3
    config.train.scale_lr = False
    config.checkpoint.every_steps = 1000
    return config
