"""DreamArtist++ on SD 1.5 with HCP-Diffusion's released example (IrisRainbowNeko/HCP-Diffusion,
cfgs/train/examples/DreamArtist++.yaml; doc/guide_DA.md): the positive word and the negative word
`<token>-neg` (3 and 6 vectors, as the DreamArtist extension; HCP leaves the counts to the user), lr 2.5e-3
each, plus a LoRA per branch of the fusion eps_n + 3 (eps_p - eps_n): the UNet's to_k, to_v and feed-forward
layers at lr 1e-4 (positive) and 4e-5 (negative), each layer's rank 0.01875 of its output width, the text
encoder's attention and MLPs at 2e-5 and rank 2, scale 1/rank (alpha 1); the loss min-SNR weighted (gamma
2); batch 4, 1000 steps, a checkpoint every 100, seed 114514. Where this differs from HCP's example (no LoRA
dropout, one weight decay, constant learning rates, no regularisation images): see
nsync_jax/train/methods/dreamartist.py. Images are captioned: the prompts are "<caption> in the style of
<token>" (and "... of <token>-neg").

  nsync-jax train --config configs/dreamartist_plus_sd15.py --workdir runs/monet_da_plus \
      --config.model=stable-diffusion-v1-5 --config.data.images=monet2photo/trainA \
      --config.data.captions=monet2photo/captions
  # learned_embeds(-neg).safetensors and lora(-neg).safetensors in the workdir; or, from any checkpoint:
  nsync-jax export --workdir runs/monet_da_plus --output monet.pt --format a1111            # monet(-neg).pt
  nsync-jax export --workdir runs/monet_da_plus --output monet.safetensors --format a1111-lora
  # As HCP's guide samples it: the positive word and LoRA on the positive branch, the negative LoRA alone on
  # the negative one (or, as DreamArtist samples, drop --negative-lora, add --embeddings for
  # learned_embeds-neg.safetensors and --negative-prompt "<illustration-special>-neg").
  nsync-jax sample --model stable-diffusion-v1-5 --embeddings runs/monet_da_plus/learned_embeds.safetensors \
      --lora runs/monet_da_plus/lora.safetensors --negative-lora runs/monet_da_plus/lora-neg.safetensors \
      --prompt "a harbour at dawn in the style of <illustration-special>" --guidance 3 --output samples/
"""
from nsync_jax import lora
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "dreamartist"
    config.trainable = "lora"
    config.placeholder_token = "<illustration-special>"
    config.initializer_token = "*"
    config.num_vectors = 3
    config.dreamartist.num_negative_vectors = 6
    config.dreamartist.guidance = 3.0
    config.dreamartist.lora_learning_rate = 1e-4
    config.dreamartist.neg_lora_learning_rate = 4e-5  # "low negative unet lr prevents image collapse"
    config.dreamartist.text_encoder_lora_learning_rate = 2e-5
    config.dreamartist.min_snr_gamma = 2.0
    config.lora.relative_rank = 0.01875  # of each layer's output width: ranks 6, 12, 24 on SD 1.5's attention
    config.lora.alpha = 1.0  # HCP's LoRA scale is 1/rank
    config.lora.targets = ("to_k", "to_v", *lora.FEED_FORWARD_TARGETS)
    config.lora.text_encoder = True
    config.lora.text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")
    config.lora.text_encoder_rank = 2
    config.data.resolution = 512
    # DreamArtist's preprocessing: a centre square (bicubic), no mirroring, one latent per image (HCP caches them).
    config.data.resize, config.data.flip, config.data.latent_sample = "center_crop", False, "once"
    config.train.steps = 1000
    config.train.batch_size = 4
    config.train.learning_rate = 2.5e-3  # the words'
    config.train.weight_decay = 5e-4  # the words' (HCP: 1e-3 for the adapters; one decay here)
    config.train.scale_lr = False
    config.train.seed = 114514
    config.checkpoint.every_steps = 100
    return config
