"""The guidance losses of pix2pix-zero and pix2pix-zeroCon, per image.

Every loss returns one value per image `(batch,)`: the editor differentiates their sum, so each image's
latents get the gradient of its own loss whatever else is in the batch.

- `cross_attention_loss`: pix2pix-zero's L_xa, the squared distance of the edit's cross-attention
  probabilities to the reference pass's.
- `cut_loss`: pix2pix-zeroCon's L_cut, PatchNCE (CUT, arXiv 2007.15651) between the edit's features and the
  reference's at the same random positions, summed over layers and patch sizes.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

# CUT masks each query's own position among the negatives with this logit (before the temperature).
MASKED_LOGIT = -10.0


def cross_attention_loss(probs: Sequence[jax.Array], reference_probs: Sequence[jax.Array]) -> jax.Array:
    """Sum over layers of the squared difference of the probabilities, summed over query positions and
    tokens and averaged over heads; each layer's maps are `(batch, heads, queries, tokens)`."""
    per_layer = [jnp.square(p.astype(jnp.float32) - r.astype(jnp.float32)).sum(axis=(2, 3)).mean(axis=1)
                 for p, r in zip(probs, reference_probs, strict=True)]
    return sum(per_layer)


def _unit_rows(features: jax.Array) -> jax.Array:
    """L2-normalised along the last axis (CUT's `Normalize`, with its epsilon)."""
    return features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-7)


def patch_nce(queries: jax.Array, keys: jax.Array, temperature: float = 0.07) -> jax.Array:
    """PatchNCE of `(batch, patches, channels)` features at the same positions: patch i of `queries` should
    match patch i of `keys` (the positive) rather than the other patches of `keys` (the negatives).

    Rows are L2-normalised; `keys` are constants (the reference, detached). Returns the mean over patches of
    -log softmax(positive / temperature) against the negatives, per image `(batch,)`.
    """
    queries, keys = _unit_rows(queries), jax.lax.stop_gradient(_unit_rows(keys))
    similarity = jnp.einsum("bic,bjc->bij", queries, keys)
    positive = jnp.diagonal(similarity, axis1=1, axis2=2)
    own = jnp.eye(similarity.shape[-1], dtype=bool)
    negatives = jnp.where(own, MASKED_LOGIT, similarity)
    logits = jnp.concatenate([positive[..., None], negatives], axis=-1) / temperature
    return (jax.nn.logsumexp(logits, axis=-1) - positive / temperature).mean(axis=-1)


def pooled_patches(features: jax.Array, patch_size: int) -> jax.Array:
    """`(batch, height, width, channels)` -> `(batch, patches, channels)`: averages over non-overlapping
    `patch_size` squares (a remainder row or column is dropped), in row-major order."""
    batch, height, width, channels = features.shape
    rows, cols = height // patch_size, width // patch_size
    cropped = features[:, :rows * patch_size, :cols * patch_size]
    pooled = cropped.reshape(batch, rows, patch_size, cols, patch_size, channels).mean(axis=(2, 4))
    return pooled.reshape(batch, rows * cols, channels)


def sample_positions(key: jax.Array, count: int, num_patches: int) -> jax.Array:
    """`min(num_patches, count)` distinct positions out of `count`, drawn at random."""
    return jax.random.permutation(key, count)[:min(num_patches, count)]


def cut_loss(features: Sequence[jax.Array], reference_features: Sequence[jax.Array], keys: jax.Array, *,
             patch_sizes: Sequence[int] = (1, 2), num_patches: int = 256, temperature: float = 0.07) -> jax.Array:
    """PatchNCE summed over layers and patch sizes, per image `(batch,)`.

    Each layer's maps are `(batch, height, width, channels)`; `keys` `(batch,)` draws each image's positions,
    one draw per layer and patch size, shared by the edit and the reference maps.
    """
    total = 0.0
    for layer, (edit, reference) in enumerate(zip(features, reference_features, strict=True)):
        for size in patch_sizes:
            queries = pooled_patches(edit.astype(jnp.float32), size)
            targets = pooled_patches(reference.astype(jnp.float32), size)
            draw = lambda key: sample_positions(jax.random.fold_in(jax.random.fold_in(key, layer), size),
                                                queries.shape[1], num_patches)
            positions = jax.vmap(draw)(keys)
            take = lambda x: jnp.take_along_axis(x, positions[..., None], axis=1)
            total = total + patch_nce(take(queries), take(targets), temperature)
    return total

