"""Textual Inversion: the token's rows (or LoRA / full weights) learn to denoise the style's images."""
from __future__ import annotations

import functools

from nsync_jax.train.methods.base import Method
from nsync_jax.train.step import group_gradients


class TextualInversion(Method):
    name = "textual_inversion"
    supports_sdxl = True

    def gradients(self, spec, config):
        return functools.partial(group_gradients, spec, 1, False)
