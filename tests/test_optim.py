"""NSYNC's orthogonal-projection optax transformation against direct numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsync_jax.optim import orthogonal_projection, refine_gradients


def proj(a, b):
    return (a @ b) / (b @ b + 1e-12) * b


def random_tree(seed):
    rng = np.random.default_rng(seed)
    return {"rows": rng.standard_normal((2, 5)).astype(np.float32), "lora": {"down": rng.standard_normal(3).astype(np.float32)}}


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


EXPECTED = {
    "orthogonal": lambda p, n, a: p - proj(p, n),
    "orthogonal_anchor": lambda p, n, a: p - proj(p, n) + proj(p, a),
    "orthogonal_anchor_refined": lambda p, n, a: (p - proj(p, n)) + proj(p - proj(p, n), a),
    "mean": lambda p, n, a: (p + n + a) / 3,
    # The released configurations, in closed form (methods.md §1.5).
    "released_v4.1": lambda p, n, a: p - proj(p, p + n),
    "released": lambda p, n, a: 2 * p - proj(p, p + n),
    "released_v5.0": lambda p, n, a: (2 * p + n) / 2,
    "released_v5.1": lambda p, n, a: (3 * p + 2 * n + a) / 3,
}


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_global_variants_match_formulas(variant):
    pos, neg, anchor = random_tree(0), random_tree(1), random_tree(2)
    refined = refine_gradients(pos, neg, anchor, variant=variant)
    expected = EXPECTED[variant](flat(pos), flat(neg), flat(anchor))
    np.testing.assert_allclose(flat(refined), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_leaf_variants_project_each_leaf(variant):
    pos, neg, anchor = random_tree(3), random_tree(4), random_tree(5)
    refined = refine_gradients(pos, neg, anchor, variant=variant, granularity="leaf")
    for r, p, n, a in zip(*(jax.tree.leaves(t) for t in (refined, pos, neg, anchor))):
        expected = EXPECTED[variant](*(np.ravel(x).astype(np.float64) for x in (p, n, a)))
        np.testing.assert_allclose(np.ravel(r), expected, rtol=1e-5, atol=1e-6)


def test_mean_without_anchor_averages_two():
    pos, neg = random_tree(0), random_tree(1)
    refined = refine_gradients(pos, neg, variant="mean")
    np.testing.assert_allclose(flat(refined), (flat(pos) + flat(neg)) / 2, rtol=1e-6)


def test_orthogonal_result_is_orthogonal_to_negative():
    pos, neg = random_tree(6), random_tree(7)
    refined = refine_gradients(pos, neg, variant="orthogonal")
    assert abs(flat(refined) @ flat(neg)) < 1e-5 * np.linalg.norm(flat(pos)) * np.linalg.norm(flat(neg))
    # A negative parallel to the positive removes it entirely: what both share is not learned.
    parallel = refine_gradients(pos, jax.tree.map(lambda x: 3 * x, pos), variant="orthogonal")
    np.testing.assert_allclose(flat(parallel), 0, atol=1e-6)


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_zero_gradients_never_nan(variant):
    zeros = jax.tree.map(np.zeros_like, random_tree(0))
    for pos, other in ((zeros, zeros), (random_tree(1), zeros), (zeros, random_tree(2))):
        refined = refine_gradients(pos, other, other, variant=variant)
        assert np.all(np.isfinite(flat(refined)))


def test_bfloat16_gradients_accumulate_in_float32():
    pos, neg, anchor = (jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_tree(s)) for s in (0, 1, 2))
    refined = refine_gradients(pos, neg, anchor)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(refined))
    as_f64 = lambda t: flat(jax.tree.map(lambda x: np.asarray(x, np.float32), t))
    expected = EXPECTED["orthogonal_anchor"](as_f64(pos), as_f64(neg), as_f64(anchor))
    np.testing.assert_allclose(as_f64(refined), expected, rtol=2e-2, atol=2e-2)


def test_in_optax_chain_under_jit():
    params = jax.tree.map(jnp.asarray, random_tree(0))
    tx = optax.chain(orthogonal_projection("orthogonal_anchor"), optax.sgd(1.0))
    state = tx.init(params)
    pos, neg, anchor = random_tree(1), random_tree(2), random_tree(3)

    @jax.jit
    def step(params, state, pos, neg, anchor):
        updates, state = tx.update(pos, state, params, negative_grads=neg, anchor_grads=anchor)
        return optax.apply_updates(params, updates), state

    new_params, _ = step(params, state, pos, neg, anchor)
    expected = flat(params) - EXPECTED["orthogonal_anchor"](flat(pos), flat(neg), flat(anchor))
    np.testing.assert_allclose(flat(new_params), expected, rtol=1e-5, atol=1e-5)


def test_works_on_sharded_arrays():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P())
    pos, neg, anchor = (jax.device_put(random_tree(s), sharding) for s in (0, 1, 2))
    refined = jax.jit(lambda p, n, a: refine_gradients(p, n, a), out_shardings=sharding)(pos, neg, anchor)
    expected = EXPECTED["orthogonal_anchor"](flat(pos), flat(neg), flat(anchor))
    np.testing.assert_allclose(flat(refined), expected, rtol=1e-5, atol=1e-6)


def test_clear_errors():
    tx = orthogonal_projection()
    pos = random_tree(0)
    with pytest.raises(ValueError, match="needs negative_grads="):
        tx.update(pos, tx.init(pos))
    with pytest.raises(ValueError, match="'orthogonal_anchor' needs anchor_grads="):
        tx.update(pos, tx.init(pos), negative_grads=random_tree(1))
    with pytest.raises(ValueError, match="negative_grads has pytree structure"):
        tx.update(pos, tx.init(pos), negative_grads={"rows": pos["rows"]}, anchor_grads=random_tree(2))
    with pytest.raises(ValueError, match="variant must be one of"):
        orthogonal_projection("paper")


def released_loop(version, pos, neg, anchor):
    """The released `contrastive_training.py` step's gradient arithmetic, replayed in torch: three backward
    passes into one `.grad` without zeroing it, snapshots after each, then the combination its `version` flags
    choose (lines 340-434 as methods.md §1.5 transcribes them)."""
    import torch

    def tensor_projection(a, b):
        return (torch.sum(a * b) / torch.sum(b * b)) * b

    row = torch.zeros(pos.shape, dtype=torch.float64, requires_grad=True)
    snapshots = []
    for gradient in (pos, neg, anchor):  # each pass's loss has this gradient with respect to the row
        (row * torch.from_numpy(gradient)).sum().backward()
        snapshots.append(row.grad.clone())
    g1, g2, g3 = snapshots
    if version == "v4.1":
        return (g1 - tensor_projection(g1, g2)).numpy()
    if version == "v4.2":
        return (g1 + tensor_projection(g1, g1) - tensor_projection(g1, g2)).numpy()
    if version == "v5.0":
        return ((g1 + g2) / 2).numpy()
    return ((g1 + g2 + g3) / 3).numpy()


@pytest.mark.parametrize("variant, version", [("released_v4.1", "v4.1"), ("released", "v4.2"),
                                              ("released_v5.0", "v5.0"), ("released_v5.1", "v5.1")])
def test_released_variants_replay_the_released_accumulating_passes(variant, version):
    pos, neg, anchor = (flat(random_tree(seed)) for seed in (8, 9, 10))
    ours = refine_gradients(*(jnp.asarray(x, jnp.float32) for x in (pos, neg, anchor)), variant=variant)
    np.testing.assert_allclose(ours, released_loop(version, pos, neg, anchor), rtol=1e-5, atol=1e-6)


def test_ema_reset_per_block_leaves_a_block_without_ema_alone():
    """Blocks of rows with their own decay and interval; a block whose decay is 1 keeps no EMA: its rows follow
    the plain updates, never reset."""
    from nsync_jax.optim import ema_reset

    tx = optax.chain(optax.sgd(0.1), ema_reset((0.5, 1.0), (2, 1), block_sizes=(1, 2)))
    params = jnp.ones((3, 2))
    state = tx.init(params)
    # Row 0 by hand: SGD steps of 0.1 x step, an EMA of decay 0.5 from 1.0, and a reset onto it every 2 steps.
    first_row = [0.9, 0.825, 0.525, 0.4]
    plain = 1.0
    for step in range(1, 5):
        updates, state = tx.update(jnp.full((3, 2), float(step)), state, params)
        params = optax.apply_updates(params, updates)
        plain -= 0.1 * step
        np.testing.assert_allclose(params[0], first_row[step - 1], rtol=1e-6)
        np.testing.assert_allclose(params[1:], plain, rtol=1e-6, atol=1e-6)
