"""Metrics over embeddings: the Fréchet distance between two sets, and the CLAP score.

- Fréchet distance between Gaussians fitted to embeddings of real and generated clips (Heusel et
  al. 2017's FID; FAD of Kilgour et al. 2019 with an audio embedding), with the matrix square root
  of SciPy.
- CLAP score: the mean cosine similarity between each clip's audio embedding and its prompt's
  text embedding (as reported by AudioLDM 2 and MusicLDM).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings.

    `|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`, computed in float64.

    Args:
      a: [N, E] embeddings (N >= 2).
      b: [M, E] embeddings (M >= 2).
      eps: diagonal offset added to both covariances when their product is singular.

    Returns:
      The distance (>= 0 up to rounding).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"Fréchet distance needs two [N >= 2, E] sets of one width, got "
                         f"{a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(a.shape[1]) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean.real)
    return float(max(value, 0.0))


def clap_score(audio_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """Mean cosine similarity of paired rows ([N, E] each)."""
    a = np.asarray(audio_embeddings, np.float64)
    t = np.asarray(text_embeddings, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(a * t, axis=1)))


def novelty(generated: np.ndarray, training: np.ndarray,
            thresholds: tuple[float, ...] = (0.9, 0.95)) -> dict:
    """MusicLDM's novelty measure: for each generated clip, its highest cosine similarity to
    any training clip (CLAP audio embeddings [N, E] and [M, E]); an exact copy of a training
    clip scores 1.

    Returns:
      {"max_similarity": per-clip list, "mean", "quantiles": {5, 25, 50, 75, 95},
       "above_T": the share of clips above each threshold T}.
    """
    g = np.asarray(generated, np.float64)
    t = np.asarray(training, np.float64)
    if g.ndim != 2 or t.ndim != 2 or g.shape[1] != t.shape[1] or not len(g) or not len(t):
        raise ValueError(f"novelty needs [N, E] and [M, E] embeddings of one width, got "
                         f"{g.shape} and {t.shape}")
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    best = (g @ t.T).max(axis=1)
    q = np.quantile(best, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"max_similarity": [float(x) for x in best], "mean": float(best.mean()),
            "quantiles": {str(p): float(v) for p, v in zip((5, 25, 50, 75, 95), q)},
            **{f"above_{th:g}": float(np.mean(best > th)) for th in thresholds}}
