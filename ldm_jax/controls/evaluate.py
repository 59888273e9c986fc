"""Scores of clips against the ground truth of their controls, with bootstrap intervals.

A clip of a dataset built with controls (`synthetic_music` with `data.controls`) stores its beats,
downbeats, notes and level curve. `ground_truth` turns them into controls at the feature frame
rate (the melody of the notes as `symbolic.melody_from_notes` defines it, the level curve
interpolated at the frames); `score_clips` extracts the controls of the clips (or of what
`transform` makes of them, e.g. codec reconstructions) and scores them: melody accuracy, dynamics
correlation (per clip, and pooled over the frames of all clips), beat F1 and downbeat F1, each
with its N and a percentile bootstrap interval of the mean. On several hosts every host calls
it: batches of clips are shared among them and the result is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ldm_jax import parallel
from ldm_jax.controls.analysis import controls_from_audio
from ldm_jax.controls.features import ControlsError, FeatureConfig
from ldm_jax.controls.metrics import (
    beat_f1,
    bootstrap_interval,
    dynamics_correlation,
    melody_accuracy,
    pooled_dynamics_correlation,
)
from ldm_jax.controls.symbolic import melody_from_notes

TRUTH_FIELDS = ("beats", "downbeats", "note_onsets", "note_offsets", "note_pitches",
                "gain_times", "gain_db")
METRICS = ("melody_accuracy", "dynamics_correlation", "beat_f1", "downbeat_f1")


def ground_truth(example: Mapping, num_frames: int, frame_rate: float) -> dict:
    """The controls a clip was made with, at `num_frames` frames of `frame_rate`."""
    missing = [k for k in TRUTH_FIELDS if k not in example]
    if missing:
        raise ControlsError(f"the clip stores no control ground truth ({', '.join(missing)}); "
                            "build the data with --config.data.controls=True")
    t = np.arange(int(num_frames)) / float(frame_rate)
    melody = melody_from_notes(example["note_onsets"], example["note_offsets"],
                               example["note_pitches"], num_frames, frame_rate)
    return {"pitch_class": melody["pitch_class"],
            "dynamics_db": np.interp(t, np.asarray(example["gain_times"], np.float64),
                                     np.asarray(example["gain_db"], np.float64)),
            "beats": np.asarray(example["beats"], np.float64),
            "downbeats": np.asarray(example["downbeats"], np.float64)}


def clip_scores(audio: np.ndarray, truth: Mapping, cfg: FeatureConfig) -> dict:
    """The four metrics of one mono clip against its `ground_truth`, and both dB curves."""
    found = controls_from_audio(np.asarray(audio, np.float32), cfg)
    frames = found["num_frames"]
    if len(truth["pitch_class"]) != frames:
        raise ControlsError(f"ground truth has {len(truth['pitch_class'])} frames, the clip "
                            f"{frames}")
    estimate_db = np.asarray(found["dynamics"]["db"], np.float64)
    return {"melody_accuracy": melody_accuracy(truth["pitch_class"],
                                               np.asarray(found["melody"]["pitch_class"])),
            "dynamics_correlation": dynamics_correlation(truth["dynamics_db"], estimate_db),
            "beat_f1": beat_f1(truth["beats"], found["rhythm"]["beats"]),
            "downbeat_f1": beat_f1(truth["downbeats"], found["rhythm"]["downbeats"]),
            "curves": (np.asarray(truth["dynamics_db"]), estimate_db)}


def summarize(rows: Sequence[Mapping], *, seed: int = 0) -> dict:
    """Mean, N (clips where the metric is defined) and 95% bootstrap interval of each metric,
    and the dynamics correlation pooled over all frames."""
    out = {}
    for name in METRICS:
        values = [float(r[name]) for r in rows if np.isfinite(r[name])]
        low, high = bootstrap_interval(values, seed=seed)
        out[name] = {"mean": float(np.mean(values)) if values else float("nan"),
                     "n": len(values), "ci95": [low, high]}
    out["dynamics_correlation_pooled"] = pooled_dynamics_correlation(
        [r["curves"][0] for r in rows], [r["curves"][1] for r in rows])
    out["num_clips"] = len(rows)
    return out


def clip_batch(examples: Sequence[Mapping], rows: range,
               transform: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> tuple[list[Mapping], np.ndarray]:
    """(the examples of ROWS, their mono clips [B, T] cut to the shortest, through `transform`
    when given and cut again to what it returns)."""
    group = [examples[i] for i in rows]
    audio = [np.asarray(e["audio"], np.float32).reshape(-1) for e in group]
    length = min(len(a) for a in audio)
    clips = np.stack([a[:length] for a in audio])
    if transform is not None:
        clips = np.asarray(transform(clips), np.float32)[:, :length]
    return group, clips


def score_clips(examples: Sequence[Mapping], cfg: FeatureConfig, *,
                transform: Callable[[np.ndarray], np.ndarray] | None = None,
                batch_size: int = 8, seed: int = 0) -> dict:
    """Scores clips (or `transform` of them) against their ground truth.

    Args:
      examples: a lazy sequence of stored examples (`audio` [T] and TRUTH_FIELDS); on several
        hosts each reads only the examples of its batches.
      cfg: the feature config (its sample rate must be the clips').
      transform: `[B, T] float32 -> [B, T']` applied to a batch of equal-length clips first
        (codec reconstruction); clips are cut to the shortest in the batch.
      batch_size: clips per batch.
      seed: of the bootstrap.

    Returns:
      `summarize` of the per-clip scores.
    """
    def batch(rows: range) -> list[dict]:
        group, clips = clip_batch(examples, rows, transform)
        out = []
        for clip, example in zip(clips, group):
            truth = ground_truth(example, cfg.num_frames(len(clip)), cfg.frame_rate)
            out.append(clip_scores(clip, truth, cfg))
        return out

    rows = [r for part in parallel.map_batches(batch, len(examples), batch_size) for r in part]
    if not rows:
        raise ControlsError("no clips to score: the split is empty")
    return summarize(rows, seed=seed)
