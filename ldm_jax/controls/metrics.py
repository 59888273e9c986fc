"""How well a clip follows a control: melody accuracy, dynamics correlation, beat and downbeat F1.

The metrics of Music ControlNet's evaluation, through `mir_eval` where it defines them:
- melody accuracy: the share of the reference's voiced frames whose estimated pitch class is
  right, an unvoiced estimate there counting as wrong. For an estimate voiced everywhere this is
  `mir_eval.melody.raw_chroma_accuracy` (tested); mir_eval's "raw" scores ignore the estimate's
  voicing, which a control that says "no melody here" must not get credit for;
- dynamics: Pearson correlation of two dB curves, per clip and pooled over clips (all frames
  of all clips in one correlation);
- beat and downbeat F1: `mir_eval.beat.f_measure` with a 70 ms window. It is called directly,
  without `mir_eval.beat.evaluate`'s default trimming of the first 5 s, which would leave
  nothing of a short clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import mir_eval
import numpy as np

from ldm_jax.controls.features import ControlsError

BEAT_WINDOW = 0.07


def melody_accuracy(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Share of the reference's voiced frames where the estimate has the same pitch class.

    Args:
      reference, estimate: int [frames] pitch classes 0-11, -1 where unvoiced.

    Returns:
      Accuracy in [0, 1]; NaN when the reference has no voiced frame.
    """
    reference, estimate = np.asarray(reference), np.asarray(estimate)
    if reference.shape != estimate.shape or reference.ndim != 1:
        raise ControlsError(f"melody accuracy compares two [frames] pitch-class sequences, got "
                            f"{reference.shape} and {estimate.shape}")
    voiced = reference >= 0
    if not np.any(voiced):
        return float("nan")
    return float(np.mean(estimate[voiced] == reference[voiced]))


def dynamics_correlation(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Pearson correlation of two dB curves [frames] (NaN when either is constant)."""
    reference = np.asarray(reference, np.float64).ravel()
    estimate = np.asarray(estimate, np.float64).ravel()
    if reference.shape != estimate.shape:
        raise ControlsError(f"dynamics curves differ in length: {reference.shape[0]} and "
                            f"{estimate.shape[0]} frames")
    if reference.size < 2 or np.std(reference) == 0 or np.std(estimate) == 0:
        return float("nan")
    return float(np.corrcoef(reference, estimate)[0, 1])


def pooled_dynamics_correlation(references: Sequence[np.ndarray],
                                estimates: Sequence[np.ndarray]) -> float:
    """One Pearson correlation over the frames of all clips together."""
    if len(references) != len(estimates):
        raise ControlsError(f"{len(references)} reference curves for {len(estimates)} estimates")
    for r, e in zip(references, estimates):
        if np.shape(r) != np.shape(e):
            raise ControlsError(f"dynamics curves differ in length: {np.shape(r)} and "
                                f"{np.shape(e)}")
    return dynamics_correlation(np.concatenate([np.ravel(r) for r in references]),
                                np.concatenate([np.ravel(e) for e in estimates]))


def beat_f1(reference: np.ndarray, estimate: np.ndarray, window: float = BEAT_WINDOW) -> float:
    """F-measure of estimated beat (or downbeat) times against reference times, in seconds,
    a hit within `window` (each reference matched once). 0 if either is empty (mir_eval)."""
    reference = np.sort(np.asarray(reference, np.float64).ravel())
    estimate = np.sort(np.asarray(estimate, np.float64).ravel())
    if reference.size == 0 and estimate.size == 0:
        return 1.0
    if reference.size == 0 or estimate.size == 0:
        return 0.0
    return float(mir_eval.beat.f_measure(reference, estimate, f_measure_threshold=window))


def bootstrap_interval(values: Sequence[float], *, n: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-clip values (NaNs dropped)."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
