"""The bundled toy-world model's recipe: a tiny Stable Diffusion (VAE, CLIP text encoder, UNet) trained from
scratch on the world's renders in about 87 minutes on 2 CPU cores (`nsync_jax/toyworld/pretrain.py` runs it;
docs/toyworld.md tells how the recipe was found).

  nsync-jax toyworld pretrain --output runs/sd-toyworld
  nsync-jax toyworld evaluate --model runs/sd-toyworld

The committed model `nsync_jax/toyworld/assets/sd-toyworld` is this file's output; it should follow seen-style
captions at style 0.915, shapes 0.85, colours 0.995 (benchmarks/RESULTS.md).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.resolution = 64
    c.pool_size = 16000  # rendered once; every stage samples from this pool
    # Two-shape scenes are where the models fail: a pool of 65% two-shape scenes (the world's default draw: 50%)
    # raised them 0.37 -> 0.515 (benchmarks/history/2026-12-04-eighth-session.md); from scratch, this recipe drew them
    # 0.65 at 65% and 0.79 at 80% (one-shape scenes 0.90 and 0.96;
    # benchmarks/history/2026-12-05-seventeenth-session.md and -eighteenth-session.md).
    c.two_shape_share = 0.8
    # Caption mix of the denoiser stage; the rest name the scene's own style.
    c.captions = ml_collections.ConfigDict(dict(drop=0.1, generic=0.2, no_style=0.1))

    # Sized for a 2-core CPU: full-resolution VAE layers are narrow. The UNet attends (self and cross) at 16x16 and
    # 8x8 latents and in its mid block: attending at 8x8 only drew two-shape scenes 0.62 (shapes 0.755) from 9,000
    # steps of batch 64; at 16x16 too a step costs 1.7x, and of the batch sizes tried, 16 for 18,000 steps drew
    # two-shape scenes 0.79 (shapes 0.86) where 64 for 5,500 drew 0.08 and 32 for 11,000 0.54
    # (benchmarks/history/2026-12-05-fourteenth-session.md to -seventeenth-session.md): this small UNet needs
    # optimizer steps more than images. 16,000 steps (shapes 0.85; 18,000 drew 0.88) leave room in the 90 minutes:
    # 18,000 took 85 to 90.5 (benchmarks/history/2026-12-06-nineteenth-session.md). 8 latent channels (SD has 4): at
    # 16x16 latents, 4 channels lost the textures and even the colours.
    c.vae = ml_collections.ConfigDict(dict(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=8,
                                           norm_num_groups=8, mid_block_add_attention=False, steps=2400,
                                           batch_size=8, learning_rate=2e-3, kl_weight=1e-6,
                                           scale_equivariance=1.0))
    # vae.scale_equivariance: weight of a second reconstruction, of the 2x-downsampled image from the 2x-pooled
    # latents (arXiv 2502.14831). Without it, 27% of the latents' power of flat scenes lay above 0.3 cycles per
    # latent pixel (neighbour correlation 0.55), detail a UNet must learn to draw; with it 11% (0.76).
    c.text_encoder = ml_collections.ConfigDict(dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                    max_length=32))
    c.unet = ml_collections.ConfigDict(dict(block_out_channels=(32, 64, 64), attention=(True, True, False),
                                            layers_per_block=1, attention_heads=2, norm_num_groups=8, steps=16000,
                                            batch_size=16, learning_rate=3e-3, ema_decay=0.998, snr_gamma=5.0))
    # unet.learning_rate: 3e-3 beat 1e-3 at every held-out timestep at equal time
    # (benchmarks/history/2026-12-03-fourth-session.md). unet.snr_gamma: Min-SNR-gamma loss weights; 0 trains on the
    # plain v-prediction error.
    c.warmup_steps = 200
    # A model folder whose VAE stage 1 reuses instead of training one (its VAE settings must equal `vae` above):
    # for work on the later stages, which then start ~8 minutes sooner.
    c.vae_from = ""
    # Each batch is split over this many simulated CPU devices when running on a CPU (`nsync-jax toyworld
    # pretrain` sets it before JAX starts): 2 ran a UNet step 1.56x faster than one device on 2 cores, 4 no better.
    c.cpu_devices = 2
    return c
