"""Flax NNX modules of Stable Diffusion 1.x/2.x, laid out like diffusers/transformers so weights map by name."""
