"""Spectral front end in pure jax.numpy: STFT, inverse STFT, mel filterbanks, decibel scales.

Numerics follow librosa (McFee et al., "librosa: Audio and Music Signal Analysis in Python", 2015):
`librosa.stft` / `istft` (centre padding, periodic window padded to `n_fft`, window-sum-square
normalisation), `librosa.filters.mel` (Slaney's Auditory Toolbox and HTK mel scales) and
`librosa.feature.melspectrogram` / `power_to_db`. Layouts are channels-last: a spectrogram of
`[..., time]` audio is `[..., frames, bins]`. Every function works under `jit`, `vmap` and `grad`.

Traced under a mesh (`jax.set_mesh`), the transforms run inside `jax.shard_map` over the batch
axes (`axes.BATCH_AXES`) whenever the leading axis divides over them: XLA's SPMD partitioner
does not split an FFT over a sharded batch axis but all-gathers the whole batch onto every
device, while each example's transform needs only that example. The results are the same.

Resampling and loudness live in `resample.py` and `loudness.py` and are re-exported here, so the
whole front end is reachable as `ldm_jax.audio.dsp.<name>`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from ldm_jax.audio.framing import frame, overlap_add
from ldm_jax.audio.loudness import loudness_lufs, loudness_normalize, peak_normalize, rms_db
from ldm_jax.audio.resample import resample, resample_numpy
from ldm_jax.axes import BATCH_AXES

__all__ = [
    "amplitude_to_db", "istft", "log_mel", "loudness_lufs", "loudness_normalize",
    "mel_filterbank", "melspectrogram", "peak_normalize", "power_to_db", "resample",
    "resample_numpy", "rms_db", "stft",
]

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=64)
def _cached_window(window: str | tuple, win_length: int, n_fft: int) -> np.ndarray:
    if window == "hann":
        # Periodic Hann, identical to scipy.signal.get_window("hann", n, fftbins=True).
        w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win_length) / win_length)
    else:
        w = scipy.signal.get_window(window, win_length, fftbins=True)
    lpad = (n_fft - win_length) // 2
    return np.pad(w, (lpad, n_fft - win_length - lpad)).astype(np.float32)


def _window(window, win_length: int, n_fft: int) -> np.ndarray:
    """Analysis window zero-padded (centred) to `n_fft`, as librosa's get_window + pad_center."""
    if win_length > n_fft:
        raise ValueError(f"win_length={win_length} exceeds n_fft={n_fft}; use win_length <= n_fft")
    if isinstance(window, str | tuple):
        return _cached_window(window, win_length, n_fft)
    w = np.asarray(window, np.float64)
    if w.shape != (win_length,):
        raise ValueError(f"window array has shape {w.shape}; it must be ({win_length},)")
    lpad = (n_fft - win_length) // 2
    return np.pad(w, (lpad, n_fft - win_length - lpad)).astype(np.float32)


def stft(x: jax.Array, n_fft: int, hop_length: int, win_length: int | None = None,
         window="hann", center: bool = True, pad_mode: str = "reflect") -> jax.Array:
    """Short-time Fourier transform with librosa's framing.

    Args:
      x: real audio, [..., time].
      n_fft: FFT size.
      hop_length: samples between frame starts.
      win_length: window length (<= n_fft); the window is zero-padded to `n_fft` in the middle.
        Defaults to `n_fft`.
      window: a `scipy.signal.get_window` name or tuple (periodic), or an array [win_length].
      center: pad `n_fft // 2` samples on both sides so frame t is centred on sample t * hop.
      pad_mode: "reflect" or "constant" (zeros), used when `center`.

    Returns:
      complex64 [..., frames, n_fft // 2 + 1], frames = 1 + (padded_time - n_fft) // hop_length.
    """
    x = _as_float(x)
    _check_stft_args(x.shape[-1], n_fft, center, pad_mode)
    w = _window(window, n_fft if win_length is None else win_length, n_fft)
    mesh, axes = _batch_shards(x, example_ndim=1)
    return _stft_jit(x, w, n_fft=n_fft, hop_length=hop_length, center=center, pad_mode=pad_mode,
                     mesh=mesh, batch_axes=axes)


def _batch_shards(x: jax.Array, example_ndim: int) -> tuple:
    """(abstract mesh, batch axes) to split the leading axis of `x` over, or (None, ()).

    Args:
      x: an array whose trailing `example_ndim` axes belong to one example.
      example_ndim: rank of one example ([time]: 1, [frames, bins]: 2).

    Returns:
      The context mesh and its non-manual batch axes when a mesh is set, `x` has a leading
      axis beyond one example and that axis divides over the axes; else (None, ()).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.ndim <= example_ndim:
        return None, ()
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    # Axes already manual (inside a caller's shard_map) hold one shard each: nothing to split.
    axes = tuple(a for a in BATCH_AXES if a in types and types[a] != AxisType.Manual)
    size = math.prod(mesh.shape[a] for a in axes)
    if size <= 1 or x.shape[0] % size:
        return None, ()
    return mesh, axes


def _per_example(fn: Callable, mesh, batch_axes: tuple, x: jax.Array, *shared) -> jax.Array:
    """`fn(x, *shared)`, split over `batch_axes` of `mesh` along the leading axis of `x`.

    `fn` must treat the rows of `x` independently; `shared` (windows, filterbanks) is the same
    on every device. Without a mesh it is a plain call.
    """
    if mesh is None:
        return fn(x, *shared)
    rows = P(batch_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows,) + (P(),) * len(shared), out_specs=rows,
                         axis_names=set(batch_axes))(x, *shared)


def _as_float(x) -> jax.Array:
    """float32 (or float64) input: FFTs have no half-precision kernels and need the range."""
    x = jnp.asarray(x)
    return x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)


def _check_stft_args(length: int, n_fft: int, center: bool, pad_mode: str) -> None:
    if center:
        if pad_mode not in ("reflect", "constant"):
            raise ValueError(f"pad_mode={pad_mode!r} is not supported; use 'reflect' or 'constant'")
        if pad_mode == "reflect" and length <= n_fft // 2:
            raise ValueError(f"signal of {length} samples is too short to reflect-pad by "
                             f"{n_fft // 2}; use a longer signal, pad_mode='constant' or a smaller "
                             "n_fft")
    elif length < n_fft:
        raise ValueError(f"signal of {length} samples is shorter than n_fft={n_fft}; use "
                         "center=True or a smaller n_fft")


def _stft_core(x, w, n_fft, hop_length, center, pad_mode):
    if center:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)], mode=pad_mode)
    n_frames = 1 + (x.shape[-1] - n_fft) // hop_length
    frames = frame(x, n_fft, hop_length, n_frames)
    return jnp.fft.rfft(frames * w, n=n_fft, axis=-1)


# One compiled program per configuration instead of one per primitive when called eagerly.
# The mesh is a static argument, so a program traced for one mesh is never reused for another.
@functools.partial(jax.jit, static_argnames=("n_fft", "hop_length", "center", "pad_mode", "mesh",
                                             "batch_axes"))
def _stft_jit(x, w, n_fft, hop_length, center, pad_mode, mesh, batch_axes):
    core = functools.partial(_stft_core, n_fft=n_fft, hop_length=hop_length, center=center,
                             pad_mode=pad_mode)
    return _per_example(core, mesh, batch_axes, x, w)


def _window_sumsquare(w: np.ndarray, hop_length: int, n_frames: int) -> np.ndarray:
    """Sum over frames of the squared window, float64 [n_fft + hop * (n_frames - 1)]."""
    w2 = np.asarray(w, np.float64) ** 2
    n_fft = w2.shape[0]
    r = -(-n_fft // hop_length)
    blocks = np.pad(w2, (0, r * hop_length - n_fft)).reshape(r, hop_length)
    total = np.zeros((n_frames + r - 1, hop_length))
    for k in range(r):
        total[k:k + n_frames] += blocks[k]
    return total.reshape(-1)[:n_fft + hop_length * (n_frames - 1)]


def istft(spec: jax.Array, hop_length: int, win_length: int | None = None,
          n_fft: int | None = None, window="hann", center: bool = True,
          length: int | None = None) -> jax.Array:
    """Inverse STFT by weighted overlap-add, normalised by the window sum-square (librosa).

    Args:
      spec: complex [..., frames, n_fft // 2 + 1], as returned by `stft`.
      hop_length: samples between frames.
      win_length: window length; defaults to `n_fft`.
      n_fft: FFT size; defaults to 2 * (bins - 1).
      window: the analysis window given to `stft`.
      center: whether `stft` centre-padded; the padding is trimmed.
      length: exact output length (zero-padded or cropped); by default the length of the
        signal the frames cover.

    Returns:
      float32 [..., time].
    """
    n_fft = 2 * (spec.shape[-1] - 1) if n_fft is None else n_fft
    win_length = n_fft if win_length is None else win_length
    n_frames = spec.shape[-2]
    if length is not None:
        padded = length + 2 * (n_fft // 2) if center else length
        n_frames = min(n_frames, -(-padded // hop_length))
    w = _window(window, win_length, n_fft)
    wss = _window_sumsquare(w, hop_length, n_frames)
    # Samples no window covers stay unnormalised, as in librosa.
    nonzero = wss > np.finfo(np.float32).tiny
    inv_wss = np.where(nonzero, 1.0 / np.where(nonzero, wss, 1.0), 1.0).astype(np.float32)
    start = n_fft // 2 if center else 0
    if length is None:
        length = inv_wss.shape[0] - 2 * start
    mesh, axes = _batch_shards(spec, example_ndim=2)
    return _istft_jit(spec, w, inv_wss, n_fft=n_fft, hop_length=hop_length, n_frames=n_frames,
                      start=start, length=length, mesh=mesh, batch_axes=axes)


@functools.partial(jax.jit, static_argnames=("n_fft", "hop_length", "n_frames", "start", "length",
                                             "mesh", "batch_axes"))
def _istft_jit(spec, w, inv_wss, n_fft, hop_length, n_frames, start, length, mesh, batch_axes):
    core = functools.partial(_istft_core, n_fft=n_fft, hop_length=hop_length, n_frames=n_frames,
                             start=start, length=length)
    return _per_example(core, mesh, batch_axes, spec, w, inv_wss)


def _istft_core(spec, w, inv_wss, n_fft, hop_length, n_frames, start, length):
    frames = jnp.fft.irfft(spec[..., :n_frames, :], n=n_fft, axis=-1) * w
    y = overlap_add(frames, hop_length) * inv_wss
    y = y[..., start:start + length]
    if y.shape[-1] < length:
        y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, length - y.shape[-1])])
    return y


def _hz_to_mel(f: np.ndarray, htk: bool) -> np.ndarray:
    f = np.asarray(f, np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # Slaney's Auditory Toolbox: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
    f_sp, min_log_hz, logstep = 200.0 / 3.0, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    mel = f / f_sp
    log_part = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, mel)


def _mel_to_hz(m: np.ndarray, htk: bool) -> np.ndarray:
    m = np.asarray(m, np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz, logstep = 200.0 / 3.0, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=64)
def _cached_mel(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float, htk: bool,
                norm: str | None) -> np.ndarray:
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    mel_pts = np.linspace(_hz_to_mel(fmin, htk), _hz_to_mel(fmax, htk), n_mels + 2)
    mel_f = _mel_to_hz(mel_pts, htk)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        # Constant energy per band: each triangle integrates to the same area.
        weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    fb = weights.T.astype(np.float32)
    fb.setflags(write=False)
    return fb


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = 128, fmin: float = 0.0,
                   fmax: float | None = None, htk: bool = False,
                   norm: str | None = "slaney") -> np.ndarray:
    """Triangular mel filterbank, equal to `librosa.filters.mel(...).T`.

    Args:
      sample_rate: audio sample rate in Hz.
      n_fft: FFT size of the spectrogram it multiplies.
      n_mels: number of mel bands.
      fmin: lowest band edge in Hz.
      fmax: highest band edge in Hz; defaults to sample_rate / 2.
      htk: use the HTK mel scale (2595 log10(1 + f / 700)) instead of Slaney's.
      norm: "slaney" divides each triangle by its width in Hz (area normalisation); None keeps
        unit-height triangles.

    Returns:
      float32 [n_fft // 2 + 1, n_mels] (read-only), so that `power_spec @ fb` is the mel spectrum.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    if norm not in ("slaney", None):
        raise ValueError(f"mel norm={norm!r} is not supported; use 'slaney' or None")
    if not 0.0 <= fmin < fmax:
        raise ValueError(f"mel band edges fmin={fmin}, fmax={fmax} must satisfy 0 <= fmin < fmax")
    return _cached_mel(int(sample_rate), int(n_fft), int(n_mels), float(fmin), fmax, bool(htk),
                       norm)


def _safe_power(power_spec: jax.Array, exponent: float) -> jax.Array:
    """`power_spec ** exponent` with a zero (not NaN) gradient at zero for exponents below 1."""
    if exponent == 1.0:
        return power_spec
    positive = power_spec > 0
    safe = jnp.where(positive, power_spec, 1.0)
    return jnp.where(positive, safe ** exponent, 0.0)


def melspectrogram(x: jax.Array, sample_rate: int, n_fft: int = 2048, hop_length: int = 512,
                   win_length: int | None = None, n_mels: int = 128, fmin: float = 0.0,
                   fmax: float | None = None, power: float = 2.0, htk: bool = False,
                   norm: str | None = "slaney", center: bool = True,
                   pad_mode: str = "reflect", window="hann") -> jax.Array:
    """Mel spectrogram `|STFT|^power @ mel_filterbank`, as `librosa.feature.melspectrogram`.

    Args:
      x: real audio, [..., time].
      sample_rate: sample rate in Hz.
      n_fft, hop_length, win_length, center, pad_mode, window: as in `stft`.
      n_mels, fmin, fmax, htk, norm: as in `mel_filterbank`.
      power: exponent of the magnitude (2 for power, 1 for magnitude).

    Returns:
      float32 [..., frames, n_mels].
    """
    return _mel(x, sample_rate, n_fft, hop_length, win_length, n_mels, fmin, fmax, power, htk,
                norm, center, pad_mode, window, None)


def _mel(x, sample_rate, n_fft, hop_length, win_length, n_mels, fmin, fmax, power, htk, norm,
         center, pad_mode, window, log_amin):
    x = _as_float(x)
    _check_stft_args(x.shape[-1], n_fft, center, pad_mode)
    w = _window(window, n_fft if win_length is None else win_length, n_fft)
    fb = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, htk, norm)
    mesh, axes = _batch_shards(x, example_ndim=1)
    return _mel_jit(x, w, fb, n_fft=n_fft, hop_length=hop_length, center=center,
                    pad_mode=pad_mode, power=float(power), log_amin=log_amin, mesh=mesh,
                    batch_axes=axes)


@functools.partial(jax.jit, static_argnames=("n_fft", "hop_length", "center", "pad_mode",
                                             "power", "log_amin", "mesh", "batch_axes"))
def _mel_jit(x, w, fb, n_fft, hop_length, center, pad_mode, power, log_amin, mesh, batch_axes):
    core = functools.partial(_mel_core, n_fft=n_fft, hop_length=hop_length, center=center,
                             pad_mode=pad_mode, power=power, log_amin=log_amin)
    return _per_example(core, mesh, batch_axes, x, w, fb)


def _mel_core(x, w, fb, n_fft, hop_length, center, pad_mode, power, log_amin):
    spec = _stft_core(x, w, n_fft, hop_length, center, pad_mode)
    power_spec = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    mel = jnp.matmul(_safe_power(power_spec, power / 2.0), fb, precision=_HIGHEST)
    return mel if log_amin is None else jnp.log10(jnp.maximum(mel, log_amin))

def power_to_db(S: jax.Array, ref: float | Callable = 1.0, amin: float = 1e-10,
                top_db: float | None = 80.0) -> jax.Array:
    """`10 log10(S / ref)`, floored at `amin` and at `max - top_db`, as `librosa.power_to_db`.

    Args:
      S: non-negative power values, any shape.
      ref: reference power, or a function of S giving it (e.g. `jnp.max`).
      amin: smallest power considered.
      top_db: dynamic range kept below the maximum; None keeps all. As in librosa the maximum
        is taken over the whole array, so batch items are not independent: vmap for per-item
        ranges.

    Returns:
      decibels, same shape as S.
    """
    ref_value = ref(S) if callable(ref) else ref
    log_spec = 10.0 * jnp.log10(jnp.maximum(amin, S))
    log_spec = log_spec - 10.0 * jnp.log10(jnp.maximum(amin, jnp.abs(ref_value)))
    if top_db is not None:
        if top_db < 0:
            raise ValueError(f"top_db={top_db} must be non-negative")
        log_spec = jnp.maximum(log_spec, jnp.max(log_spec) - top_db)
    return log_spec


def amplitude_to_db(S: jax.Array, ref: float | Callable = 1.0, amin: float = 1e-5,
                    top_db: float | None = 80.0) -> jax.Array:
    """`20 log10(|S| / ref)` with librosa's floors: `power_to_db(|S|^2, ref^2, amin^2, top_db)`.

    Args:
      S: amplitudes (real or complex), any shape.
      ref: reference amplitude, or a function of |S| giving it.
      amin: smallest amplitude considered.
      top_db: dynamic range kept below the maximum (over the whole array); None keeps all.

    Returns:
      decibels, same shape as S.
    """
    magnitude = jnp.abs(S)
    ref_value = ref(magnitude) if callable(ref) else abs(ref)
    return power_to_db(magnitude ** 2, ref=jnp.asarray(ref_value) ** 2, amin=amin ** 2,
                       top_db=top_db)


def log_mel(x: jax.Array, sample_rate: int, n_fft: int = 2048, hop_length: int = 512,
            win_length: int | None = None, n_mels: int = 128, fmin: float = 0.0,
            fmax: float | None = None, power: float = 2.0, htk: bool = False,
            norm: str | None = "slaney", center: bool = True, pad_mode: str = "reflect",
            window="hann", amin: float = 1e-5) -> jax.Array:
    """`log10(max(melspectrogram(x, ...), amin))`, the compressed mel features models consume.

    Unlike `power_to_db` there is no `top_db` clipping, so batch items stay independent.

    Args:
      x: real audio, [..., time].
      sample_rate, n_fft, hop_length, win_length, n_mels, fmin, fmax, power, htk, norm, center,
        pad_mode, window: as in `melspectrogram`.
      amin: floor applied before the logarithm.

    Returns:
      float32 [..., frames, n_mels].
    """
    return _mel(x, sample_rate, n_fft, hop_length, win_length, n_mels, fmin, fmax, power, htk,
                norm, center, pad_mode, window, float(amin))
