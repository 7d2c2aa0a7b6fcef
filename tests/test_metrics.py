"""The estimators against independent float64 formulas on random features (the reference tools' own algebra)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from nsync_jax.metrics import (bootstrap_frechet_distance, clip_score, cmmd, csd_score, frechet_distance,
                               kernel_inception_distance)


def _fid_by_eigenvalues(a, b):
    """torch-fidelity's and torchmetrics' form: Tr (S_a S_b)^1/2 as the sum of sqrt(eigenvalues)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s_a @ s_b).astype(complex)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_sqrt)


def test_frechet_distance_matches_the_eigenvalue_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(size=(200, 24)) @ rng.normal(size=(24, 24)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(_fid_by_eigenvalues(a, b), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8
    # Two large samples of N(0, I) and N(m, I): the distance is close to |m|^2.
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    x, y = rng.normal(size=(20000, 4)), rng.normal(size=(20000, 4)) + shift
    assert frechet_distance(x, y) == pytest.approx(shift @ shift, rel=0.03)
    # Fewer samples than dimensions (singular covariances, as with a few hundred images of 2048 features):
    # still the exact value, where scipy's sqrtm of the product returns complex round-off.
    small_a, small_b = rng.normal(size=(30, 64)), rng.normal(size=(20, 64)) * 1.5 + 0.1
    assert frechet_distance(small_a, small_b) == pytest.approx(_fid_by_eigenvalues(small_a, small_b), rel=1e-6)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(a, b[:, :5])


def test_bootstrap_frechet_distance_resamples_both_sets():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(50, 8)) + 0.2
    result = bootstrap_frechet_distance(a, b, num_draws=10, seed=3)
    draws = np.random.default_rng(3)
    expected = [_fid_by_eigenvalues(a[draws.integers(0, 60, 60)], b[draws.integers(0, 50, 50)]) for _ in range(10)]
    assert result.value == pytest.approx(np.mean(expected), rel=1e-6)
    assert result.std == pytest.approx(np.std(expected), rel=1e-5)
    assert result.subset_size == 10


def _mmd2_unbiased_by_loops(x, y):
    """Bińkowski et al.'s unbiased MMD^2 written out pair by pair (gan-metrics' and torch-fidelity's form)."""
    d, m = x.shape[1], len(x)
    k = lambda u, v: (u @ v / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kernel_inception_distance_matches_the_pairwise_formula_on_the_same_subsets():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.3
    result = kernel_inception_distance(a, b, subset_size=1000, num_subsets=4, seed=5)
    assert result.subset_size == 30  # capped at the smaller set
    draws = np.random.default_rng(5)
    expected = []
    for _ in range(4):
        x, y = a[draws.choice(40, 30, replace=False)], b[draws.choice(30, 30, replace=False)]
        expected.append(_mmd2_unbiased_by_loops(x, y))
    assert result.value == pytest.approx(np.mean(expected), rel=1e-6)
    assert result.std == pytest.approx(np.std(expected), rel=1e-6)


def test_kernel_inception_distance_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(1)
    x, y, z = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(size=(300, 8)) + 0.5
    same = kernel_inception_distance(x, y, subset_size=100, num_subsets=50)
    assert abs(same.value) < 0.05 and same.std > 0
    far = kernel_inception_distance(x, z, subset_size=100, num_subsets=50)
    assert far.value > 0.2 and far.value > 5 * far.std


def _unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_cmmd_matches_the_cmmd_papers_formula():
    rng = np.random.default_rng(3)
    a = _unit(rng.normal(size=(121, 32)))
    b = _unit(rng.normal(size=(90, 32)) + 0.4)
    gamma = 1 / (2 * 10.0 ** 2)
    k = lambda u, v: np.exp(-gamma * cdist(u, v, "sqeuclidean"))
    biased = 1000 * (k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
    assert cmmd(a, b).value == pytest.approx(biased, rel=1e-5)
    off_diagonal = lambda m: (m.sum() - np.trace(m)) / (len(m) * (len(m) - 1))
    unbiased = 1000 * (off_diagonal(k(a, a)) + off_diagonal(k(b, b)) - 2 * k(a, b).mean())
    assert cmmd(a, b, biased=False).value == pytest.approx(unbiased, rel=1e-5)
    # The biased estimator's excess over the unbiased one at ~100 images is what the docs warn about.
    assert cmmd(a, b).value - cmmd(a, b, biased=False).value > 0.05
    # Block-wise sums give the same value as one block.
    from nsync_jax import metrics
    assert metrics._rbf_sum(a, b, gamma, False, block=7) == pytest.approx(k(a, b).sum(), rel=1e-12)


def test_csd_score_is_the_cosine_to_the_mean_real_embedding():
    rng = np.random.default_rng(4)
    generated, real = _unit(rng.normal(size=(20, 16)) + 1.0), _unit(rng.normal(size=(30, 16)) + 1.0)
    result = csd_score(generated, real)
    mean_real = real.mean(0)
    per_image = generated @ mean_real / (np.linalg.norm(generated, axis=1) * np.linalg.norm(mean_real))
    assert result.value == pytest.approx(per_image.mean(), rel=1e-10)
    assert result.std == pytest.approx(per_image.std(), rel=1e-10)
    # The identity the NSYNC evaluation relies on: mean pairwise cosine divided by |mean real embedding|.
    pairwise = (generated @ real.T).mean()
    assert result.value == pytest.approx(pairwise / np.linalg.norm(mean_real), rel=1e-10)
    assert result.value > pairwise


def test_clip_score_conventions():
    rng = np.random.default_rng(5)
    image, text = rng.normal(size=(12, 8)), rng.normal(size=(12, 8))
    cos = (_unit(image) * _unit(text)).sum(1)
    assert clip_score(image, text, scale=1.0, clamp="none").value == pytest.approx(cos.mean(), rel=1e-10)
    assert clip_score(image, text, scale=2.5, clamp="pair").value == pytest.approx(
        (2.5 * np.maximum(cos, 0)).mean(), rel=1e-10)
    assert clip_score(image, text).value == pytest.approx(max(100 * cos.mean(), 0.0), abs=1e-10)
    assert clip_score(image, -image).value == 0.0  # the mean clamp
    with pytest.raises(ValueError, match="clamp"):
        clip_score(image, text, clamp="max")
    with pytest.raises(ValueError, match="matched"):
        clip_score(image, text[:5])
