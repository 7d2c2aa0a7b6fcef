"""Training methods, each one object registered by name (`base.Method` is the interface).

The trainer looks a method up with `get(config.method)`; `register(method)` adds another, from any module.
"""
from nsync_jax.train.methods.base import REGISTRY, Method, Word, get, register
from nsync_jax.train.methods.dreamartist import DreamArtist
from nsync_jax.train.methods.nsync import NSYNC
from nsync_jax.train.methods.styleforge import StyleForge
from nsync_jax.train.methods.textual_inversion import TextualInversion

for _method in (TextualInversion(), NSYNC(), DreamArtist(), StyleForge()):
    register(_method)

__all__ = ["REGISTRY", "Method", "Word", "get", "register"]
