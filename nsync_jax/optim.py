"""The contrastive methods' optimizer pieces as optax transformations that any optax training loop can use:
NSYNC's gradient refinement, and DreamArtist's per-word clipping, per-word learning rates and EMA reset.

With proj(a, b) = (<a, b> / (<b, b> + eps)) b, the positive gradient g_p is refined with the gradient of
the caption-matched synthetic negative g_n (and of a random other positive, the anchor g_a):

  orthogonal                 g_p - proj(g_p, g_n)                    (the paper's Eq. 1)
  orthogonal_anchor          g_p - proj(g_p, g_n) + proj(g_p, g_a)   (the paper's rule; the default)
  orthogonal_anchor_refined  r + proj(r, g_a), r = g_p - proj(g_p, g_n)   (ablation A2: the refined gradient,
                                                                      not the positive one, onto the anchor)
  mean                       mean of g_p, g_n and, when given, g_a   (what the released "v5.x" comments say)

The released `contrastive_training.py` runs its positive, negative and anchor passes without zeroing the
gradient between them, so the snapshots it combines are S1 = g_p, S2 = g_p + g_n and S3 = g_p + g_n + g_a.
What each of its configurations therefore computes:

  released_v4.1              S1 - proj(S1, S2)       = g_p - proj(g_p, g_p + g_n)
  released (= "v4.2", the    S1 + proj(S1, S1)       = 2 g_p - proj(g_p, g_p + g_n)   (its anchor pass is
    released default)          - proj(S1, S2)                                       never read)
  released_v5.0              (S1 + S2) / 2           = (2 g_p + g_n) / 2
  released_v5.1              (S1 + S2 + S3) / 3      = (3 g_p + 2 g_n + g_a) / 3
The v5.x configurations also prompt the negative with "<caption> not in the style of <token>"
(`nsync.negative_prompt="not_in_style"` in the trainer).

Put it first in a chain, and pass the other gradients as extra arguments to `update`::

    tx = optax.chain(orthogonal_projection("orthogonal_anchor"), optax.adamw(1e-3, weight_decay=1e-2))
    opt_state = tx.init(params)
    ...
    updates, opt_state = tx.update(pos_grads, opt_state, params,
                                   negative_grads=neg_grads, anchor_grads=anchor_grads)
    params = optax.apply_updates(params, updates)

`granularity="global"` projects the whole pytree as one flat vector (the paper's single token);
`"leaf"` projects each leaf on its own (LoRA-style pytrees). Dot products accumulate in float32, so
bfloat16 gradients are fine, and a zero gradient gives zero, never NaN (the eps guards the division).

DreamArtist trains two words stored as consecutive row blocks of one matrix `(rows, width)` (the positive
word's rows, then the negative's): `clip_row_blocks` and `scale_row_blocks` treat each block as the separate
torch parameter it is in the released code, and `ema_reset` keeps its embedding EMA::

    tx = optax.chain(clip_row_blocks((3, 6), 1.0), optax.adamw(3e-3, weight_decay=1e-2),
                     scale_row_blocks((3, 6), (1.0, 0.5)), ema_reset(0.97, every=25))
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

VARIANTS = ("orthogonal", "orthogonal_anchor", "orthogonal_anchor_refined", "mean", "released_v4.1", "released",
            "released_v5.0", "released_v5.1")
# The variants that read the anchor's gradient ("mean" when it is given); the others run no anchor pass.
ANCHOR_VARIANTS = ("orthogonal_anchor", "orthogonal_anchor_refined", "mean", "released_v5.1")
# The released code's snapshots: its gradients accumulate over the passes (see the module docstring).
_RELEASED_SNAPSHOTS = {"released_v4.1": 2, "released": 2, "released_v5.0": 2, "released_v5.1": 3}
GRANULARITIES = ("global", "leaf")


def _dot(a_leaves, b_leaves) -> jax.Array:
    return sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32)).real for a, b in zip(a_leaves, b_leaves))


def _projection_coefficient(a_leaves, b_leaves, eps: float) -> jax.Array:
    """<a, b> / (<b, b> + eps), the scale of b in proj(a, b), in float32."""
    return _dot(a_leaves, b_leaves) / (_dot(b_leaves, b_leaves) + eps)


def _refine(pos, neg, anchor, variant: str, eps: float):
    """The refined gradient for lists of matching leaves (one group: the whole tree, or one leaf)."""
    scaled = lambda leaves, c: [c * x.astype(jnp.float32) for x in leaves]
    add = lambda *trees: [sum(xs) for xs in zip(*trees)]
    project = lambda a, b: scaled(b, _projection_coefficient(a, b, eps))  # proj(a, b)
    if variant in _RELEASED_SNAPSHOTS:
        s1, s2 = pos, add(pos, neg)
        snapshots = [s1, s2] + ([add(s2, anchor)] if _RELEASED_SNAPSHOTS[variant] == 3 else [])
        if variant == "released_v4.1":
            return add(scaled(s1, 1.0), scaled(project(s1, s2), -1.0))
        if variant == "released":
            return add(scaled(s1, 1.0), project(s1, s1), scaled(project(s1, s2), -1.0))
        return scaled(add(*snapshots), 1.0 / len(snapshots))
    if variant == "mean":
        given = [pos, neg] + ([anchor] if anchor is not None else [])
        return scaled(add(*given), 1.0 / len(given))
    refined = add(scaled(pos, 1.0), scaled(project(pos, neg), -1.0))
    if variant == "orthogonal_anchor":
        refined = add(refined, project(pos, anchor))
    if variant == "orthogonal_anchor_refined":
        refined = add(refined, project(refined, anchor))
    return refined


def refine_gradients(pos_grads, negative_grads, anchor_grads=None, *, variant: str = "orthogonal_anchor",
                     granularity: str = "global", eps: float = 1e-12):
    """The refined gradient pytree (same structure and dtypes as `pos_grads`); see the module docstring."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if negative_grads is None:
        raise ValueError("orthogonal_projection.update needs negative_grads=")
    if variant in ANCHOR_VARIANTS and variant != "mean" and anchor_grads is None:
        raise ValueError(f"variant {variant!r} needs anchor_grads=")
    structure = jax.tree.structure(pos_grads)
    for name, tree in (("negative_grads", negative_grads), ("anchor_grads", anchor_grads)):
        if tree is not None and jax.tree.structure(tree) != structure:
            raise ValueError(f"{name} has pytree structure {jax.tree.structure(tree)}, "
                             f"pos_grads has {structure}")
    pos = jax.tree.leaves(pos_grads)
    neg = jax.tree.leaves(negative_grads)
    anchor = jax.tree.leaves(anchor_grads) if anchor_grads is not None else None
    if granularity == "global":
        refined = _refine(pos, neg, anchor, variant, eps)
    else:
        refined = [_refine([p], [n], None if anchor is None else [anchor[i]], variant, eps)[0]
                   for i, (p, n) in enumerate(zip(pos, neg))]
    return jax.tree.unflatten(structure, [r.astype(p.dtype) for r, p in zip(refined, pos)])


class OrthogonalProjectionState(NamedTuple):
    """Stateless: the refinement uses only the current step's gradients."""


def orthogonal_projection(variant: str = "orthogonal_anchor", granularity: str = "global",
                          eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
    """NSYNC's gradient refinement as an optax transformation; `update` takes `negative_grads=` and
    `anchor_grads=` as keyword extra arguments (see the module docstring)."""
    # Fail at construction on a bad name, not at the first step.
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")

    def init(params):
        del params
        return OrthogonalProjectionState()

    def update(updates, state, params=None, *, negative_grads=None, anchor_grads=None, **extra_args):
        del params, extra_args
        refined = refine_gradients(updates, negative_grads, anchor_grads, variant=variant,
                                   granularity=granularity, eps=eps)
        return refined, state

    return optax.GradientTransformationExtraArgs(init, update)


# ------------------------------------------------------------------------------------------------------------
# DreamArtist: transformations over blocks of rows (one block per learned word).
# ------------------------------------------------------------------------------------------------------------

def _split_rows(x: jax.Array, block_sizes: tuple[int, ...]) -> list[jax.Array]:
    if x.shape[0] != sum(block_sizes):
        raise ValueError(f"an array of {x.shape[0]} rows does not split into blocks of {block_sizes} rows")
    return jnp.split(x, np.cumsum(block_sizes)[:-1], axis=0)


def clip_row_blocks(block_sizes: tuple[int, ...], max_norm: float) -> optax.GradientTransformation:
    """Clips each block of rows to norm `max_norm` on its own, as torch's `clip_grad_norm_` called once per
    parameter: g * min(1, max_norm / (||g|| + 1e-6)). Updates are arrays `(sum(block_sizes), width)`."""
    block_sizes = tuple(block_sizes)

    def clip(x):
        blocks = []
        for block in _split_rows(x, block_sizes):
            norm = jnp.sqrt(jnp.sum(jnp.square(block.astype(jnp.float32))))
            blocks.append(block * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(block.dtype))
        return jnp.concatenate(blocks)

    return optax.stateless(lambda updates, params=None: jax.tree.map(clip, updates))


def scale_row_blocks(block_sizes: tuple[int, ...], scales: tuple[float, ...]) -> optax.GradientTransformation:
    """Multiplies the updates of block i by `scales[i]`. After `optax.adamw` this is a per-block learning rate,
    weight decay included, as torch's AdamW parameter groups with their own `lr`."""
    if len(scales) != len(block_sizes):
        raise ValueError(f"{len(scales)} scales for {len(block_sizes)} blocks")
    per_row = np.repeat(np.asarray(scales, np.float32), block_sizes)[:, None]
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u: u * per_row.astype(u.dtype), updates))


class EmaResetState(NamedTuple):
    count: jax.Array  # int32 updates taken
    ema: optax.Params  # exponential moving average of the parameters after each update


def ema_reset(decay, every, block_sizes: tuple[int, ...] | None = None) -> optax.GradientTransformation:
    """Keeps an EMA of the parameters, ema <- decay ema + (1 - decay) params after each update (starting from
    the initial parameters), and every `every` updates sets the parameters to it (DreamArtist's `ema_w`,
    `ema_rep_step`). With `block_sizes`, `decay` and `every` are given per block of rows (DreamArtist's words
    have their own: `ema_w`, `ema_rep_step` and `ema_w_neg`, `ema_rep_step_neg`); parameters whose decay is 1
    keep no EMA and are never reset. Put it last in a chain: it reads the parameters the other updates lead to."""
    decays, everies = np.atleast_1d(np.asarray(decay, np.float32)), np.atleast_1d(np.asarray(every, np.int32))
    if not np.all((decays > 0.0) & (decays <= 1.0)):
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if not np.all(everies >= 1):
        raise ValueError(f"every must be at least 1, got {every}")
    if block_sizes is not None:  # one value per row, broadcast over the row's width
        if not len(decays) == len(everies) == len(block_sizes):
            raise ValueError(f"{len(decays)} decays and {len(everies)} intervals for {len(block_sizes)} blocks")
        decays, everies = (np.repeat(x, block_sizes)[:, None] for x in (decays, everies))
    elif decays.size != 1 or everies.size != 1:
        raise ValueError("several decays or intervals need block_sizes")
    else:
        decays, everies = decays[0], everies[0]

    def init(params):
        return EmaResetState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.array, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema_reset needs params")
        stepped = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decays * e + (1 - decays) * p, state.ema, stepped)
        count = state.count + 1
        reset = (count % everies == 0) & (decays < 1)
        # On a reset step the update moves the parameters onto the EMA instead (exact up to rounding).
        updates = jax.tree.map(lambda u, e, p: jnp.where(reset, (e - p).astype(u.dtype), u), updates, ema, params)
        return updates, EmaResetState(count, ema)

    return optax.GradientTransformation(init, update)
