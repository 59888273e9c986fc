"""The seam measure: how abrupt a clip is where pieces were joined, against elsewhere.

A clip made of pieces (windows of long-form generation, a loop played twice) can jump where they
meet. The spectral discontinuity at time tau is the largest frame-to-frame change of the log-mel
spectrogram (the RMS over bands of the dB difference between neighbouring frames) among the
frames whose windows reach tau; the same statistic at every frame position at least one window
away from every seam and from the ends is the clip's own variation. A seam no larger than the
within-clip median is as smooth as an ordinary moment of the clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import librosa
import numpy as np


def frame_changes(audio: np.ndarray, sample_rate: int, *, n_fft: int = 1024, hop: int = 256,
                  n_mels: int = 64) -> np.ndarray:
    """d[t] [frames]: RMS over mel bands of the dB change from frame t - 1 to frame t (d[0] =
    0); frames centred at t * hop."""
    mel = librosa.feature.melspectrogram(y=np.asarray(audio, np.float32).reshape(-1),
                                         sr=sample_rate, n_fft=n_fft, hop_length=hop,
                                         n_mels=n_mels, center=True)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    d = np.sqrt(np.mean(np.square(np.diff(db, axis=1)), axis=0))
    return np.concatenate([[0.0], d])


def seam_discontinuity(audio: np.ndarray, boundaries: Sequence[float], sample_rate: int, *,
                       n_fft: int = 1024, hop: int = 256) -> dict:
    """Spectral discontinuity at the seams of a clip against within the clip.

    Args:
      audio: mono clip [T].
      boundaries: seam times in seconds.
      sample_rate: its rate.
      n_fft, hop: of the log-mel frames.

    Returns:
      {"seams": the value at each seam, "seam_mean", "within_median", "within_quantiles"
       ({25, 75, 90}), "seam_rank": the share of within positions below each seam's value
       (mean over seams), "within_n": positions measured}.
    """
    d = frame_changes(audio, sample_rate, n_fft=n_fft, hop=hop)
    centres = np.arange(len(d)) * hop
    reach = n_fft // 2 + hop  # frame t and t - 1 both matter for d[t]

    def local(tau: float) -> float:
        near = np.abs(centres - tau) <= reach
        return float(d[near].max()) if near.any() else float("nan")

    seams_at = [float(b) * sample_rate for b in boundaries]
    values = [local(tau) for tau in seams_at]
    total = len(np.asarray(audio).reshape(-1))
    # Positions whose neighbourhood holds no seam and no frame padded at the clip's ends.
    far = [c for c in centres[1:] if n_fft + reach <= c <= total - n_fft - reach
           and all(abs(c - tau) > 2 * reach for tau in seams_at)]
    within = np.asarray([local(c) for c in far])
    if not len(within):
        raise ValueError("the clip is too short around its seams to measure its own variation")
    q = np.quantile(within, [0.25, 0.5, 0.75, 0.9])
    return {"seams": values, "seam_mean": float(np.mean(values)) if values else float("nan"),
            "within_median": float(q[1]),
            "within_quantiles": {"25": float(q[0]), "75": float(q[2]), "90": float(q[3])},
            "seam_rank": float(np.mean([np.mean(within < v) for v in values])) if values
            else float("nan"), "within_n": int(len(within))}


def spectral_mismatch(a: np.ndarray, b: np.ndarray, sample_rate: int, *, n_fft: int = 1024,
                      hop: int = 256, n_mels: int = 64) -> float:
    """RMS over mel bands and frames of the dB difference between two clips' log-mel
    spectrograms (cut to the shorter): how different two regions sound, phase aside."""
    n = min(len(a), len(b))

    def db(x):
        mel = librosa.feature.melspectrogram(y=np.asarray(x[:n], np.float32), sr=sample_rate,
                                             n_fft=n_fft, hop_length=hop, n_mels=n_mels)
        return 10.0 * np.log10(np.maximum(mel, 1e-10))

    return float(np.sqrt(np.mean(np.square(db(a) - db(b)))))


def crossfade_loop(audio: np.ndarray, cut: int, fade: int) -> np.ndarray:
    """A loop of audio[:cut] that repeats without a jump: its first `fade` samples fade from
    audio[cut:cut + fade] (what followed the cut point) into the clip's own start, with
    equal-power gains; played in a loop, sample cut - 1 leads into audio[cut] as it did."""
    audio = np.asarray(audio, np.float32)
    fade = int(min(fade, len(audio) - cut, cut))
    if fade <= 0:
        return audio[:cut].copy()
    ramp = np.linspace(0.0, 1.0, fade, endpoint=False, dtype=np.float32)
    out = audio[:cut].copy()
    out[:fade] = np.cos(0.5 * np.pi * ramp) * audio[cut:cut + fade] + \
        np.sin(0.5 * np.pi * ramp) * audio[:fade]
    return out
