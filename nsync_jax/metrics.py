"""Distances between two sets of image features: Fréchet distance (FID's formula) and kernel distance (KID's).

Feature extraction is the caller's (Inception for real images, the toy world's judge for toy images); these
work on plain `(N, d)` arrays in float64 numpy, where the matrix square root is accurate enough for FID.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: expected features of shape (N >= 2, d), got {x.shape}")
    return x


def frechet_distance(a, b) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).

    The product S_a S_b can be singular (fewer samples than dimensions); as in pytorch-fid, a small ridge then
    makes its square root finite, and the square root's round-off imaginary part is dropped.
    """
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        ridge = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(covmean).max()))
        if np.abs(covmean.imag).max() > 1e-3 * scale:
            raise ValueError(f"frechet_distance: matrix square root has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def kernel_inception_distance(a, b, subset_size: int = 100, num_subsets: int = 50,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    Returns (mean, std) over `num_subsets` pairs of subsets drawn without replacement; the subset size is
    capped at the smaller set. Unlike FID it is unbiased, so it is near 0 (possibly negative) for two sets
    from one distribution, whatever their size.
    """
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))
