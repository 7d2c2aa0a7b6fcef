"""nsync-jax: learn a visual style for Stable Diffusion in JAX/Flax (NSYNC, Textual Inversion and relatives)."""

__version__ = "0.1.0"
