"""Discrete beats and downbeats, and the frame-wise activations a rhythm control is made of.

Beats come from librosa's dynamic-programming tracker (Ellis 2007) run on our onset envelope.
librosa gives no downbeats, so they are estimated by folding the beats' accents at the bar
period: of the `beats_per_bar` phases of the beat sequence, the one whose beats are most
accented on average starts the bars. Music accents its downbeats with loud onsets (the kick)
and with chord changes, so a beat's accent is its onset strength plus its harmonic change.
An activation is a train of Gaussian bumps at given times, one frame wide by default,
so that a rhythm control from tracked beats, from a MIDI tempo map or from ground truth has one
form. This runs on the host (numpy): the discrete tracker is not differentiable, the onset
envelope it reads is.
"""

from __future__ import annotations

import librosa
import numpy as np

from ldm_jax.controls.features import ControlsError, FeatureConfig


def track_beats(onset: np.ndarray, cfg: FeatureConfig, *, start_bpm: float = 120.0,
                tightness: float = 100.0) -> np.ndarray:
    """Beat times in seconds from an onset envelope [frames] (librosa's tracker).

    Args:
      onset: the onset strength of one clip (`features.onset_strength`).
      cfg: the feature config the envelope was computed with.
      start_bpm: the tracker's prior tempo.
      tightness: how strictly beats follow the estimated tempo.

    Returns:
      float64 [beats], increasing (empty for a silent clip).
    """
    onset = np.asarray(onset, np.float64)
    if onset.ndim != 1:
        raise ControlsError(f"track_beats takes one clip's onset envelope [frames], got shape "
                            f"{onset.shape}")
    if not np.any(onset > 0):
        return np.zeros(0)
    _, beats = librosa.beat.beat_track(onset_envelope=onset, sr=cfg.sample_rate,
                                       hop_length=cfg.hop_length, start_bpm=start_bpm,
                                       tightness=tightness, units="time")
    return np.asarray(beats, np.float64)


def harmonic_change(beats: np.ndarray, harmony: np.ndarray, frame_rate: float) -> np.ndarray:
    """At each beat, 1 - cosine similarity of the mean chroma over the beat before it and over
    the beat after it: chords change on the bar."""
    frames = np.clip(np.round(np.asarray(beats) * frame_rate).astype(int), 0, len(harmony))
    edges = np.concatenate([[0], frames, [len(harmony)]])
    spans = [harmony[a:max(b, a + 1)].mean(0) for a, b in zip(edges[:-1], edges[1:])]
    out = []
    for before, after in zip(spans[:-1], spans[1:]):
        norm = np.linalg.norm(before) * np.linalg.norm(after)
        out.append(1.0 - float(before @ after / norm) if norm > 0 else 0.0)
    return np.asarray(out)


def estimate_downbeats(beats: np.ndarray, onset: np.ndarray, cfg: FeatureConfig, *,
                       harmony: np.ndarray | None = None, beats_per_bar: int = 4) -> np.ndarray:
    """Downbeat times (seconds): every `beats_per_bar`-th beat, from the phase whose beats
    are most accented on average (ties: the earliest phase). A beat's accent is its onset
    strength over the clip's mean, plus, given the chromagram, its harmonic change
    (`harmonic_change`, between 0 and 1).

    Args:
      beats: beat times in seconds, increasing.
      onset: the onset envelope [frames] the beats were tracked on.
      cfg: its feature config.
      harmony: the full-band chromagram [frames, 12] (`features.extract(...)["harmony"]`).
      beats_per_bar: beats in a bar (4 for 4/4).
    """
    if beats_per_bar < 1:
        raise ControlsError(f"beats_per_bar must be at least 1, got {beats_per_bar}")
    beats = np.asarray(beats, np.float64)
    if beats.size == 0:
        return beats
    onset = np.asarray(onset, np.float64)
    frames = np.clip(np.round(beats * cfg.frame_rate).astype(int), 0, onset.shape[-1] - 1)
    # The strongest onset within one frame of each beat (the tracker may be a frame off).
    strength = np.max(np.stack([onset[np.clip(frames + d, 0, onset.shape[-1] - 1)]
                                for d in (-1, 0, 1)]), axis=0)
    accent = strength / max(float(strength.mean()), 1e-12)
    if harmony is not None:
        change = harmonic_change(beats, np.asarray(harmony, np.float64), cfg.frame_rate)
        accent = accent + change  # in [0, 1]: near 0 where the harmony never changes
    phases = min(beats_per_bar, beats.size)
    scores = [accent[p::beats_per_bar].mean() for p in range(phases)]
    return beats[int(np.argmax(scores))::beats_per_bar]


def activation(times: np.ndarray, num_frames: int, frame_rate: float, *,
               width_frames: float = 1.0) -> np.ndarray:
    """A train of unit Gaussian bumps (standard deviation `width_frames`) at `times` seconds,
    combined by maximum, float32 [num_frames]."""
    t = np.arange(int(num_frames))[:, None] / float(frame_rate)
    times = np.asarray(times, np.float64)
    if times.size == 0:
        return np.zeros(int(num_frames), np.float32)
    sigma = width_frames / float(frame_rate)
    bumps = np.exp(-0.5 * np.square((t - times[None, :]) / sigma))
    return bumps.max(axis=1).astype(np.float32)


def beat_grid(beats: np.ndarray, downbeats: np.ndarray, num_frames: int,
              frame_rate: float) -> dict[str, np.ndarray]:
    """The rhythm control of one clip: {"beats", "downbeats": times in seconds,
    "beat_activation", "downbeat_activation": float32 [frames]}."""
    return {"beats": np.asarray(beats, np.float64),
            "downbeats": np.asarray(downbeats, np.float64),
            "beat_activation": activation(beats, num_frames, frame_rate),
            "downbeat_activation": activation(downbeats, num_frames, frame_rate)}
