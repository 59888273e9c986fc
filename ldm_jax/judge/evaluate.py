"""The judge's accuracy on labelled clips, or on what a transform (a codec) makes of them.

On several hosts every host calls `accuracy`: batches of clips are shared among them and the
result is the same everywhere. Each head's accuracy comes with its N and a percentile bootstrap
interval of the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ldm_jax import parallel
from ldm_jax.controls.evaluate import clip_batch
from ldm_jax.controls.metrics import bootstrap_interval
from ldm_jax.judge.model import Predictor
from ldm_jax.judge.train import labels_of


def accuracy(predictor: Predictor, examples: Sequence, *,
             transform: Callable[[np.ndarray], np.ndarray] | None = None,
             batch_size: int = 16, seed: int = 0) -> dict:
    """Accuracy of each head on stored examples (`audio` [T] and the attribute fields).

    Args:
      predictor: the judge.
      examples: a lazy sequence of examples; on several hosts each reads only its batches.
      transform: `[B, T] -> [B, T']` applied to each batch first (codec reconstruction).
      batch_size: clips per batch (cut to the shortest in the batch).
      seed: of the bootstrap.

    Returns:
      {"{head}_accuracy": float, "{head}_accuracy/n": int, "{head}_accuracy/ci95": [lo, hi]}.
    """
    heads = predictor.model.config.heads

    def batch(rows: range) -> list[dict]:
        group, clips = clip_batch(examples, rows, transform)
        picks = predictor.predict(list(clips))
        truth = [labels_of(e, heads) for e in group]
        return [{k: float(heads[k].index(picks[k][j]) == truth[j][k]) for k in heads}
                for j in range(len(group))]

    rows = [r for part in parallel.map_batches(batch, len(examples), batch_size) for r in part]
    out = {}
    for k in heads:
        values = [r[k] for r in rows]
        out[f"{k}_accuracy"] = float(np.mean(values)) if values else float("nan")
        out[f"{k}_accuracy/n"] = len(values)
        out[f"{k}_accuracy/ci95"] = list(bootstrap_interval(values, seed=seed))
    return out
