"""Musical control features from audio: melody, dynamics and rhythm, pure JAX.

The three time-varying controls of Music ControlNet (Wu et al., TASLP 2024), computed from one
STFT per clip at any frame rate (a hop of `sample_rate / frame_rate` samples; centred frames, so
frame t describes time t / frame_rate):

- melody: a 12-bin chromagram of the signal high-passed by a 2nd-order Butterworth filter at
  middle C (261.6 Hz), so that bass does not dominate; the per-frame argmax as a one-hot, a soft
  version (a softmax of the normalised chroma over a temperature) for gradients, and a voicing
  mask (frames whose energy above the cutoff is below `voicing_db` dBFS carry no melody). The
  filter is applied as its magnitude response on the STFT bins, which is what a chromagram of
  the filtered signal sees.
- dynamics: frame energy in dB of the mel-weighted power spectrum, floored `dynamics_range_db`
  below the clip's loudest frame, smoothed by a Savitzky-Golay filter of about one second (edge
  frames padded with their nearest value).
- rhythm: librosa's onset strength (spectral flux of the log-mel spectrogram, mean over bands),
  differentiable; discrete beats and downbeats from it on the host (`beats.py`).

Everything here is `jit`- and `grad`-friendly; `extract` computes all of it in one jitted call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import scipy.signal

from ldm_jax.audio import dsp
from ldm_jax.config import Section

MIDDLE_C = 261.6


class ControlsError(ValueError):
    """Bad input to a control feature (the message says which argument and why)."""


@dataclasses.dataclass(frozen=True)
class FeatureConfig(Section):
    """How the control features are computed (`from_dict` checks a config section's keys).

    Attributes:
      sample_rate: of the audio, Hz.
      frame_rate: feature frames per second (the latent frame rate of the codec by default in
        the commands); `sample_rate / frame_rate` must be a whole number of samples.
      n_fft: FFT size of the one STFT every feature reads.
      cutoff_hz: high-pass cutoff of the melody chromagram (Music ControlNet: middle C).
      voicing_db: frames whose high-passed level is below this (dBFS; a full-scale sine is -3)
        carry no melody.
      temperature: of the soft melody's softmax over the max-normalised chroma.
      n_mels: mel bands of the dynamics and onset features.
      dynamics_range_db: frames quieter than the clip's loudest by more than this are raised
        to that floor before smoothing.
      smooth_seconds: Savitzky-Golay window of the dynamics curve (rounded to an odd number of
        frames, at most the clip's length).
      smooth_order: polynomial order of that filter.
    """

    SECTION: ClassVar[str] = "controls.features"
    LABEL: ClassVar[str] = "control feature config"
    ERROR: ClassVar[type[Exception]] = ControlsError

    sample_rate: int
    frame_rate: float
    n_fft: int = 2048
    cutoff_hz: float = MIDDLE_C
    voicing_db: float = -45.0
    temperature: float = 0.05
    n_mels: int = 64
    dynamics_range_db: float = 30.0
    smooth_seconds: float = 1.0
    smooth_order: int = 2

    def __post_init__(self):
        if self.sample_rate <= 0 or self.frame_rate <= 0:
            raise ControlsError(f"sample_rate and frame_rate must be positive, got "
                                f"{self.sample_rate} and {self.frame_rate}")
        hop = self.sample_rate / self.frame_rate
        if abs(hop - round(hop)) > 1e-6 * hop or round(hop) < 1:
            raise ControlsError(f"frame rate {self.frame_rate} Hz is not a whole number of "
                                f"samples at {self.sample_rate} Hz; use a rate that divides it")
        if not 0 < self.cutoff_hz < self.sample_rate / 2:
            raise ControlsError(f"cutoff_hz={self.cutoff_hz} must lie between 0 and Nyquist")
        if self.temperature <= 0:
            raise ControlsError(f"temperature must be positive, got {self.temperature}")

    @classmethod
    def from_section(cls, section, *, sample_rate: int, frame_rate: float) -> FeatureConfig:
        """The config of a `controls.features` section (None: the defaults) for audio at
        SAMPLE_RATE, at FRAME_RATE unless the section sets a frame rate (0: unset)."""
        fields = dict(section or {})
        if not fields.get("frame_rate"):
            fields["frame_rate"] = float(frame_rate)
        return cls.from_dict({"sample_rate": int(sample_rate), **fields})

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate / self.frame_rate))

    def num_frames(self, num_samples: int) -> int:
        """Centred frames of a clip of `num_samples` samples."""
        return 1 + int(num_samples) // self.hop_length


@functools.lru_cache(maxsize=16)
def _highpass_gain(sample_rate: int, n_fft: int, cutoff: float) -> np.ndarray:
    """|H(f)|^2 of the 2nd-order Butterworth high-pass at the rfft bin frequencies."""
    b, a = scipy.signal.butter(2, cutoff, btype="highpass", fs=sample_rate)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    _, h = scipy.signal.freqz(b, a, worN=freqs, fs=sample_rate)
    return (np.abs(h) ** 2).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _chroma_filters(sample_rate: int, n_fft: int) -> np.ndarray:
    """librosa's chroma filterbank (C first, A440 tuning), as [bins, 12]."""
    fb = librosa.filters.chroma(sr=sample_rate, n_fft=n_fft, tuning=0.0, base_c=True)
    return np.ascontiguousarray(fb.T, np.float32)


@functools.lru_cache(maxsize=16)
def savgol_coefficients(window: int, order: int) -> np.ndarray:
    """Smoothing coefficients of a Savitzky-Golay filter (`scipy.signal.savgol_coeffs`)."""
    return scipy.signal.savgol_coeffs(window, order).astype(np.float32)


def smoothing_window(cfg: FeatureConfig, frames: int) -> int:
    """The odd Savitzky-Golay window of about `smooth_seconds`, at most `frames` long (0: the
    clip is too short to smooth)."""
    window = int(round(cfg.smooth_seconds * cfg.frame_rate)) | 1
    window = min(window, frames if frames % 2 else frames - 1)
    return window if window > cfg.smooth_order else 0


def savgol(x: jax.Array, window: int, order: int) -> jax.Array:
    """Savitzky-Golay smoothing over the last axis, edges padded with the nearest value
    (`scipy.signal.savgol_filter(..., mode="nearest")`). `window` 0 returns `x`."""
    if window == 0:
        return x
    coeffs = jnp.asarray(savgol_coefficients(window, order))
    half = window // 2
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    padded = jnp.pad(x, pad, mode="edge")
    frames = x.shape[-1]
    idx = jnp.arange(frames)[:, None] + jnp.arange(window)[None, :]
    # savgol_coeffs is ordered for convolution: reversed, it is the correlation kernel.
    return jnp.einsum("...tw,w->...t", padded[..., idx], coeffs[::-1])


@functools.lru_cache(maxsize=64)
def _coverage(num_samples: int, n_fft: int, hop_length: int) -> np.ndarray:
    """Share of each centred frame's window energy that falls inside the clip (1 in the middle,
    about 1/2 at the ends, where the STFT pads zeros): the level of an edge frame is divided by
    it, so that a steady sound keeps its level up to the ends."""
    w2 = np.square(scipy.signal.get_window("hann", n_fft, fftbins=True))
    frames = 1 + num_samples // hop_length
    idx = np.arange(frames)[:, None] * hop_length - n_fft // 2 + np.arange(n_fft)[None, :]
    inside = (idx >= 0) & (idx < num_samples)
    return np.maximum((inside * w2).sum(1) / w2.sum(), 1e-3).astype(np.float32)


def _level_db(power: jax.Array, n_fft: int) -> jax.Array:
    """Mean-square level of each frame in dBFS from its one-sided power spectrum (Parseval
    over the Hann window)."""
    window_energy = n_fft * 0.375  # sum of the periodic Hann window squared
    full = 2.0 * jnp.sum(power, axis=-1) - power[..., 0] - power[..., -1]
    return 10.0 * jnp.log10(jnp.maximum(full / (n_fft * window_energy), 1e-12))


def power_spectrum(audio: jax.Array, cfg: FeatureConfig) -> tuple[jax.Array, jax.Array]:
    """(|STFT|^2 [..., frames, bins], the frames' window coverage [frames, 1])."""
    # Zero padding at the ends (librosa's default since 0.10): no mirrored onsets.
    spec = dsp.stft(audio, cfg.n_fft, cfg.hop_length, pad_mode="constant")
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    return power, jnp.asarray(_coverage(audio.shape[-1], cfg.n_fft, cfg.hop_length))[:, None]


def melody_from_power(power: jax.Array, cfg: FeatureConfig,
                      coverage: jax.Array | float = 1.0) -> dict[str, jax.Array]:
    """Melody features from a power spectrogram [..., frames, bins] (see `melody`); levels are
    divided by `coverage` (`_coverage`)."""
    high = power * jnp.asarray(_highpass_gain(cfg.sample_rate, cfg.n_fft, cfg.cutoff_hz))
    chroma = high @ jnp.asarray(_chroma_filters(cfg.sample_rate, cfg.n_fft))
    chroma = chroma / jnp.maximum(jnp.max(chroma, axis=-1, keepdims=True), 1e-20)
    voiced = _level_db(high / coverage, cfg.n_fft) > cfg.voicing_db
    pitch = jnp.argmax(chroma, axis=-1)
    one_hot = jax.nn.one_hot(pitch, 12) * voiced[..., None]
    soft = jax.nn.softmax(chroma / cfg.temperature, axis=-1) * voiced[..., None]
    return {"chroma": chroma, "one_hot": one_hot, "soft": soft, "voiced": voiced,
            "pitch_class": jnp.where(voiced, pitch, -1)}


def harmony_from_power(power: jax.Array, cfg: FeatureConfig) -> jax.Array:
    """The chromagram of the whole spectrum (bass included), each frame summing to one."""
    chroma = power @ jnp.asarray(_chroma_filters(cfg.sample_rate, cfg.n_fft))
    return chroma / jnp.maximum(jnp.sum(chroma, axis=-1, keepdims=True), 1e-20)


def dynamics_from_power(power: jax.Array, cfg: FeatureConfig,
                        coverage: jax.Array | float = 1.0) -> dict[str, jax.Array]:
    """Dynamics features from a power spectrogram [..., frames, bins] (see `dynamics`); levels
    are divided by `coverage` (`_coverage`)."""
    fb = jnp.asarray(dsp.mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels))
    energy = jnp.sum((power / coverage) @ fb, axis=-1)
    raw = 10.0 * jnp.log10(jnp.maximum(energy, 1e-10))
    # Rests and silence sit at most `dynamics_range_db` below the clip's loudest frame, so a
    # breath between phrases is a dip, not a fall to the numerical floor.
    raw = jnp.maximum(raw, jnp.max(raw, axis=-1, keepdims=True) - cfg.dynamics_range_db)
    window = smoothing_window(cfg, power.shape[-2])
    return {"raw_db": raw, "db": savgol(raw, window, cfg.smooth_order)}


def onset_from_power(power: jax.Array, cfg: FeatureConfig) -> jax.Array:
    """librosa's onset strength (`librosa.onset.onset_strength`, centred, lag 1, mean over
    `n_mels` bands of the dB mel spectrogram with top_db 80) [..., frames]."""
    fb = jnp.asarray(dsp.mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels))
    db = 10.0 * jnp.log10(jnp.maximum(power @ fb, 1e-10))
    # librosa's top_db floor, per clip (dsp.power_to_db takes one maximum over a whole batch).
    db = jnp.maximum(db, jnp.max(db, axis=(-2, -1), keepdims=True) - 80.0)
    flux = jnp.mean(jax.nn.relu(db[..., 1:, :] - db[..., :-1, :]), axis=-1)
    shift = 1 + cfg.n_fft // (2 * cfg.hop_length)
    frames = power.shape[-2]
    pad = [(0, 0)] * (flux.ndim - 1) + [(shift, 0)]
    return jnp.pad(flux, pad)[..., :frames]


def melody(audio: jax.Array, cfg: FeatureConfig) -> dict[str, jax.Array]:
    """Melody of audio [..., time].

    Returns:
      chroma float32 [..., frames, 12] (C first, each frame max-normalised); one_hot [.., 12]
      (zero where unvoiced); soft [..., 12] (softmax over `temperature`, zero where unvoiced);
      voiced bool [..., frames]; pitch_class int [..., frames] (-1 where unvoiced).
    """
    power, coverage = power_spectrum(audio, cfg)
    return melody_from_power(power, cfg, coverage)


def dynamics(audio: jax.Array, cfg: FeatureConfig) -> dict[str, jax.Array]:
    """Dynamics of audio [..., time]: raw_db and smoothed db, float32 [..., frames]."""
    power, coverage = power_spectrum(audio, cfg)
    return dynamics_from_power(power, cfg, coverage)


def onset_strength(audio: jax.Array, cfg: FeatureConfig) -> jax.Array:
    """Onset strength envelope of audio [..., time], float32 [..., frames]."""
    return onset_from_power(power_spectrum(audio, cfg)[0], cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def extract(audio: jax.Array, cfg: FeatureConfig) -> dict[str, jax.Array]:
    """Every differentiable control feature of audio [..., time] from one STFT, one jitted
    call: {"melody": melody(...), "dynamics": dynamics(...), "onset": onset envelope,
    "harmony": the full-band chromagram [..., frames, 12] (for the downbeat estimate)}."""
    power, coverage = power_spectrum(audio, cfg)
    return {"melody": melody_from_power(power, cfg, coverage),
            "dynamics": dynamics_from_power(power, cfg, coverage),
            "onset": onset_from_power(power, cfg), "harmony": harmony_from_power(power, cfg)}
