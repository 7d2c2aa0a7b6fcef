"""DreamArtist on SD 1.5 with the released webui extension's defaults (IrisRainbowNeko/DreamArtist-sd-webui-
extension, 2023-04): a positive word of 3 vectors and a negative word `<token>-neg` of 6, both starting
from "*" (the negative with N(0, 1e-3^2) noise), fused as eps_n + 3 (eps_p - eps_n) in training; lr 3e-3 (the
negative's times neg_lr_weight = 1), batch 1, 8000 steps, AdamW (0.9, 0.999) with weight decay 1e-2, each
word's gradient clipped to norm 1, no EMA. The extension's reconstruction loss is off by default ("uncheck if
low VRAM"); --config.dreamartist.reconstruction=True adds it (lambda 1). Images are captioned: the prompts are
"<caption> in the style of <token>" (and "... of <token>-neg"); without captions, the style templates.

  nsync-jax train --config configs/dreamartist_sd15.py --workdir runs/monet_da \
      --config.model=stable-diffusion-v1-5 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions
  nsync-jax export --workdir runs/monet_da --output monet.pt --format a1111     # monet.pt and monet-neg.pt
  nsync-jax sample --model stable-diffusion-v1-5 --embeddings runs/monet_da/learned_embeds.safetensors \
      --embeddings runs/monet_da/learned_embeds-neg.safetensors \
      --prompt "a harbour at dawn in the style of <illustration-special>" \
      --negative-prompt "<illustration-special>-neg" --guidance 3 --output samples/
"""
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "dreamartist"
    config.placeholder_token = "<illustration-special>"
    config.initializer_token = "*"
    config.num_vectors = 3
    config.dreamartist.num_negative_vectors = 6
    config.dreamartist.guidance = 3.0
    config.dreamartist.reconstruction = False
    config.data.resolution = 512
    # The released preprocessing: a centre square (bicubic), no mirroring, one latent per image for the run.
    config.data.resize, config.data.flip, config.data.latent_sample = "center_crop", False, "once"
    config.train.steps = 8000
    config.train.batch_size = 1
    config.train.learning_rate = 3e-3
    config.train.scale_lr = False
    config.checkpoint.every_steps = 1000
    return config
