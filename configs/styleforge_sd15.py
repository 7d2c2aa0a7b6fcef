"""Single-StyleForge (StyleBoost) on SD 1.5 with the released scripts' settings: DreamBooth-style full
fine-tuning of the UNet and the text encoder, binding ~15-20 StyleRef images to "zwx style" and ~15-20 Aux
images (mostly people) to "style" in the same step, loss MSE(ref) + 1.0 x MSE(aux); lr 1e-6 constant, AdamW
(0.9, 0.999) with weight decay 1e-2 (released: bitsandbytes' 8-bit AdamW; here float32), 1 + 1 images per step,
1000 steps, the short side resized to 512 then a random crop (fixed once, as the released posterior cache), no
flip, seed 1337. Prompts are padded to 77 tokens (the released fork pads to the longest prompt in the batch).
The VAE is stabilityai/sd-vae-ft-mse, as in the released scripts (its encoder is SD 1.5's; its decoder draws the
samples and goes into the exported pipeline); --config.vae= keeps the model's own. Each StyleRef image is paired
with an Aux image once, by index, as the released loader pairs them.

  nsync-jax train --config configs/styleforge_sd15.py --workdir runs/anime-sf \
      --config.model=stable-diffusion-v1-5 --config.data.images=anime/styleref \
      --config.data.aux_images=anime/aux
  nsync-jax export --workdir runs/anime-sf --format diffusers-pipeline --output anime-sf-model
  nsync-jax sample --model anime-sf-model --scheduler ddim --steps 30 --guidance 7 \
      --prompt "a photo of zwx style, a girl, closed shot" --output samples/

The paper's evaluation (nsync_jax/evaluate.py, --protocol styleforge): 2 images for each line of the released
prompt list (prompt.txt of github.com/ION-dgu/StyleBoost, not shipped: it has no licence), DDIM 30 steps,
guidance 7, the released negative prompt; FID and KID against the reference style images, and the CLIP score
of each image with its raw line:

  nsync-jax sample --model anime-sf-model --prompts-file StyleBoost/prompt.txt --num-images 2 \
      --template "a photo of zwx style, {caption}" --scheduler ddim --steps 30 --guidance 7 --output sf-eval \
      --negative-prompt "(worst quality, low quality:1.2), canvas frame, ((disfigured)), ((bad art)), ((deformed)),((extra limbs)), weird colors, blurry, (((duplicate))), ((morbid)), ((mutilated)), [out of frame], extra fingers, mutated hands, ((poorly drawn hands)), ((poorly drawn face)), (((mutation))), 3d render"
  nsync-jax evaluate --protocol styleforge --real anime/reference --generated sf-eval \
      --captions StyleBoost/prompt.txt --metrics fid,kid,clip --weights weights --output sf-scores.json

Without Aux images, --config.styleforge.generate_aux=20 draws 20 with the class prompt from the base model first
(DreamBooth's class images). On 8 devices, split the batch and the weights: --config.train.batch_size=8
--config.mesh.data=1 --config.mesh.fsdp=-1 (full weights, gradients and AdamW state are sharded over fsdp);
--config.trainable=lora trains LoRA adapters instead of the full weights.
"""
from nsync_jax.train.config import default_config


def get_config():
    config = default_config()
    config.method = "styleforge"
    config.vae = "stabilityai/sd-vae-ft-mse"
    config.trainable = "full"
    config.full.train_text_encoder = True
    config.styleforge.instance_prompt = "zwx style"
    config.styleforge.class_prompt = "style"
    config.styleforge.prior_loss_weight = 1.0
    config.data.resolution = 512
    config.data.resize = "random_crop"
    config.data.flip = False
    config.train.steps = 1000
    config.train.batch_size = 1
    config.train.learning_rate = 1e-6
    config.train.scale_lr = False
    config.train.weight_decay = 1e-2
    config.train.seed = 1337
    config.checkpoint.every_steps = 250
    config.checkpoint.keep = 2  # a full checkpoint of SD 1.5 with its AdamW state is about 10 GB
    config.sample.scheduler = "ddim"
    config.sample.steps = 30
    config.sample.guidance = 7.0
    return config
