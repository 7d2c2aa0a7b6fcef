"""What a run trains, as values the trainer is given: token rows, LoRA adapters or the full weights.

Each trainable is one object that knows what is trained (the initial pytree, split off the loaded model by an
NNX filter), how it enters the modules in the step (`module_states`, `embed`), how it is placed on the mesh,
how it is shown to the pipeline that draws previews, and which files it writes. The trainer looks one up by
`config.trainable` in `REGISTRY` and never asks which one it has; `register` adds another (a test adds one that
trains only the UNet's normalisation layers).

- `embeddings`: the new token rows `(num_vectors, width)` of the method's words (`Method.words`), embedded in
  place of the placeholder ids; the text encoder and UNet stay frozen.
- `lora`: `nnx.LoRAParam` adapters that `lora.add_lora` puts on the targeted linear layers. With a method that
  fuses branches (`Method.lora_branches`: DreamArtist++) it is `BranchedLoRA`: the method's words and one set
  of adapters per branch.
- `full`: every `nnx.Param` of the UNet (and of the text encoder with `full.train_text_encoder`; on SDXL of both
  text encoders), with float32 master copies split over `fsdp` like frozen weights.
Weights of modules come as flat dicts `{component: {path: array}}` (`lora.flat_params`); the VAE is always frozen.
"""
from nsync_jax.train.trainables.base import REGISTRY, Trainable, check_sdxl, get, register, split_frozen
from nsync_jax.train.trainables.embeddings import (DECAYED_TABLE, EMBEDDINGS, SDXL_EMBEDDINGS, DecayedTableEmbeddings,
                                                   Embeddings, SDXLEmbeddings)
from nsync_jax.train.trainables.weights import FULL, LORA, BranchedLoRA, LoRA, ModuleWeights, lora_rank

__all__ = ["REGISTRY", "Trainable", "check_sdxl", "get", "register", "split_frozen", "DECAYED_TABLE", "EMBEDDINGS",
           "SDXL_EMBEDDINGS", "DecayedTableEmbeddings", "Embeddings", "SDXLEmbeddings", "FULL", "LORA",
           "BranchedLoRA", "LoRA", "ModuleWeights", "lora_rank"]
