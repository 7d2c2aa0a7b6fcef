"""Multi-StyleForge on SD 1.5: two concepts fine-tuned into one model, as the released Multi-StyleBoost script
does: the style ("zwx style" on StyleRef images, "style" on Aux images) and its people ("a ukj person" on the
style's images of people, "a photo of person" on photos of people). The schedule is the released one ("mixed"):
each concept's (StyleRef, Aux) pairs are cached once, and each epoch is one shuffled pass over both concepts'
pairs (multi_boost.py iterates loader 1, then loader 2, only while caching). --config.styleforge.schedule=joint
alternates the concepts step by step; =staged trains them one after the other in the order of their names
(1_background, then 2_people, as a Single-StyleBoost script trained people on top of a background checkpoint),
with a fresh optimizer at each concept. The other settings, and the VAE (stabilityai/sd-vae-ft-mse), are
configs/styleforge_sd15.py's.

  nsync-jax train --config configs/multi_styleforge_sd15.py --workdir runs/anime-msf \
      --config.model=stable-diffusion-v1-5 \
      --config.styleforge.concepts.1_background.images=anime/backgrounds \
      --config.styleforge.concepts.1_background.aux_images=aux/backgrounds \
      --config.styleforge.concepts.2_people.images=anime/people \
      --config.styleforge.concepts.2_people.aux_images=aux/people
  nsync-jax export --workdir runs/anime-msf --format diffusers-pipeline --output anime-msf-model
  nsync-jax sample --model anime-msf-model --scheduler ddim --steps 30 --guidance 8 \
      --prompt "a ukj person in a barn, zwx style" --output samples/
"""
from pathlib import Path

import ml_collections

from nsync_jax.config import load_config
from nsync_jax.train.methods.styleforge import CONCEPT_KEYS


def concept(instance_prompt: str, class_prompt: str) -> ml_collections.ConfigDict:
    entry = ml_collections.ConfigDict({key: "" for key in CONCEPT_KEYS})
    entry.instance_prompt, entry.class_prompt = instance_prompt, class_prompt
    return entry


def get_config():
    config = load_config(Path(__file__).with_name("styleforge_sd15.py"))
    config.styleforge.schedule = "mixed"  # as released
    config.styleforge.concepts = ml_collections.ConfigDict({
        "1_background": concept("zwx style", "style"),
        "2_people": concept("a ukj person", "a photo of person")})
    config.train.steps = 2000  # 1000 per concept
    return config
