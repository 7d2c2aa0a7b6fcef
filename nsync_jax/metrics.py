"""Distances between two sets of image features: FID, KID, CMMD, the NSYNC paper's CSD score and CLIP score.

Feature extraction is the caller's (`nsync_jax.evaluate` for image folders, the toy world's judge for toy
images); these work on plain `(N, d)` arrays in float64 numpy on the host, where the matrix square root and
the differences of near-equal kernel sums (CMMD's are all within 2% of 1) stay accurate. Random draws
(KID's subsets, the bootstrap) come from a seeded `numpy.random.Generator`, so a score is reproducible.

Each estimator returns an `Estimate`: the value, its spread where one is defined (over subsets, bootstrap
draws or images) and the sizes it used, since every one of these is biased or noisy at a few hundred images
and is only comparable at equal set sizes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Estimate(NamedTuple):
    value: float
    std: float | None = None
    # KID's subset size (capped at the smaller set), the bootstrap's draw count, or None.
    subset_size: int | None = None


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: expected features of shape (N >= 2, d), got {x.shape}")
    return x


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    return a, b


def frechet_distance(a, b) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).

    Tr (S_a S_b)^1/2 is computed as Tr (S_a^1/2 S_b S_a^1/2)^1/2, the same number, from two symmetric
    eigendecompositions with eigenvalues clipped at 0. With fewer images than dimensions (the usual case: a
    few hundred images, 2048 Inception features) the covariances are singular; there scipy's `sqrtm` of the
    product, which pytorch-fid and clean-fid use, returns complex round-off or needs a ridge, while this form
    stays real and exact.
    """
    a, b = _pair(a, b)
    return _frechet(a, b)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def bootstrap_frechet_distance(a, b, num_draws: int = 10, seed: int = 0) -> Estimate:
    """Mean and std of FID over `num_draws` resamples with replacement of both sets.

    What the NSYNC paper's FID script (gan-metrics-pytorch) reports. Resampling repeats images, which
    lowers the covariances' rank and raises FID above the plain estimate (about 6% at 121 images).
    """
    a, b = _pair(a, b)
    rng = np.random.default_rng(seed)
    values = [_frechet(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
              for _ in range(num_draws)]
    return Estimate(float(np.mean(values)), float(np.std(values)), num_draws)


def kernel_inception_distance(a, b, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0) -> Estimate:
    """Unbiased MMD^2 with the cubic kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    Returns the mean and std over `num_subsets` pairs of subsets drawn without replacement, and the subset
    size, capped at the smaller set as clean-fid does (the reference tools raise below 1000 images). Unlike
    FID it is unbiased, so it is near 0 (possibly negative) for two sets from one distribution.
    """
    a, b = _pair(a, b)
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
    return Estimate(float(np.mean(values)), float(np.std(values)), m)


def _rbf_sum(x: np.ndarray, y: np.ndarray, gamma: float, skip_diagonal: bool, block: int = 2048) -> float:
    """Sum of exp(-gamma |x_i - y_j|^2) over all pairs, in row blocks so memory stays O(block * len(y))."""
    y_sq = (y * y).sum(1)
    total = 0.0
    for start in range(0, len(x), block):
        xb = x[start:start + block]
        sq = np.maximum((xb * xb).sum(1)[:, None] + y_sq[None, :] - 2 * xb @ y.T, 0.0)
        k = np.exp(-gamma * sq)
        if skip_diagonal:
            rows = np.arange(len(xb))
            k[rows, start + rows] = 0.0
        total += k.sum()
    return float(total)


def cmmd(a, b, sigma: float = 10.0, scale: float = 1000.0, biased: bool = True) -> Estimate:
    """CMMD: `scale` times the MMD^2 between two embedding sets under a Gaussian RBF kernel of width `sigma`.

    The default is the CMMD paper's (and the NSYNC paper's) estimator: the biased V-statistic, whose means
    keep the kernel's diagonal; at 121 images that adds about 0.08 to the value, so it is kept for
    comparability. `biased=False` drops the within-set diagonals (unbiased, can be negative). Embeddings are
    used as given: the CMMD pipeline L2-normalises them first.
    """
    a, b = _pair(a, b)
    gamma = 1.0 / (2 * sigma ** 2)
    n, m = len(a), len(b)
    if biased:
        k_aa = _rbf_sum(a, a, gamma, False) / (n * n)
        k_bb = _rbf_sum(b, b, gamma, False) / (m * m)
    else:
        k_aa = _rbf_sum(a, a, gamma, True) / (n * (n - 1))
        k_bb = _rbf_sum(b, b, gamma, True) / (m * (m - 1))
    k_ab = _rbf_sum(a, b, gamma, False) / (n * m)
    return Estimate(float(scale * (k_aa + k_bb - 2 * k_ab)))


def _cosine(x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """Row-wise cosine as torch's `CosineSimilarity(eps)`: x.y / max(|x| |y|, eps)."""
    norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return (x * y).sum(-1) / np.maximum(norms, eps)


def csd_score(generated, real, eps: float = 1e-6) -> Estimate:
    """The NSYNC paper's CSD score: mean over generated images of cos(f(g_i), mean_j f(r_j)).

    `f` are CSD style embeddings (L2-normalised). The real mean is not re-normalised, so the score equals the
    mean pairwise cosine divided by |mean real embedding| and is never below it. The std is over images.
    """
    generated, real = _pair(generated, real)
    per_image = _cosine(generated, real.mean(0)[None, :], eps)
    return Estimate(float(per_image.mean()), float(per_image.std()))


CLIP_SCORE_CLAMPS = ("mean", "pair", "none")


def clip_score(image_emb, text_emb, scale: float = 100.0, clamp: str = "mean") -> Estimate:
    """CLIP score of matched (image, text) embedding pairs: scale * cos(image_i, text_i), averaged.

    The defaults are torchmetrics' `CLIPScore` (x100, the mean clamped at 0); Hessel et al.'s CLIPScore is
    `scale=2.5, clamp="pair"` (each pair clamped at 0); the `clip-score` package is `scale=1, clamp="none"`.
    The std is over pairs, before the mean clamp.
    """
    if clamp not in CLIP_SCORE_CLAMPS:
        raise ValueError(f"clamp={clamp!r} is not one of {CLIP_SCORE_CLAMPS}")
    image_emb, text_emb = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"expected matched (N, d) embeddings, got {image_emb.shape} and {text_emb.shape}")
    per_pair = scale * _cosine(image_emb, text_emb, 1e-8)
    if clamp == "pair":
        per_pair = np.maximum(per_pair, 0.0)
    value = float(per_pair.mean())
    if clamp == "mean":
        value = max(value, 0.0)
    return Estimate(value, float(per_pair.std()))
