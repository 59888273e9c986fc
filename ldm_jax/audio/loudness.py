"""Levels and loudness: peak and RMS levels, ITU-R BS.1770-4 integrated loudness (LUFS).

Integrated loudness follows Recommendation ITU-R BS.1770-4 (2015): K-weighting (a +4 dB high
shelf modelling the head, then a ~38 Hz high-pass), mean square over 400 ms blocks with 75 %
overlap, an absolute gate at -70 LUFS, a relative gate 10 LU below the loudness of the blocks that
pass it, and `-0.691 + 10 log10(sum_c G_c z_c)`. The standard tabulates the filters at 48 kHz
only; for any rate they are rebuilt from their analogue prototypes by the bilinear transform with
the prototype parameters libebur128 derived from that table (the 48 kHz coefficients are
reproduced to 1e-15). Filtering is an FFT convolution with the filters' impulse response, so
loudness is parallel and differentiable under `jit`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal

# Analogue prototypes of BS.1770's two K-weighting stages (libebur128's fit to the 48 kHz table).
_SHELF_HZ, _SHELF_GAIN_DB, _SHELF_Q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
_SHELF_VB_EXPONENT = 0.4996667741545416
_HIGHPASS_HZ, _HIGHPASS_Q = 38.13547087602444, 0.5003270373238773
_BLOCK_S, _STEP_S = 0.4, 0.1
_ABSOLUTE_GATE_LUFS, _RELATIVE_GATE_LU = -70.0, -10.0
# Channel weights G_c for L, R, C, Ls, Rs (BS.1770-4 table 3); an LFE channel is not measured.
_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)


@functools.lru_cache(maxsize=16)
def k_weighting(sample_rate: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """BS.1770 K-weighting as two biquads `((b, a), (b, a))`, float64, a[0] = 1."""
    k = math.tan(math.pi * _SHELF_HZ / sample_rate)
    vh = 10.0 ** (_SHELF_GAIN_DB / 20.0)
    vb = vh ** _SHELF_VB_EXPONENT
    a0 = 1.0 + k / _SHELF_Q + k * k
    shelf_b = np.array([vh + vb * k / _SHELF_Q + k * k, 2.0 * (k * k - vh),
                        vh - vb * k / _SHELF_Q + k * k]) / a0
    shelf_a = np.array([a0, 2.0 * (k * k - 1.0), 1.0 - k / _SHELF_Q + k * k]) / a0
    k = math.tan(math.pi * _HIGHPASS_HZ / sample_rate)
    a0 = 1.0 + k / _HIGHPASS_Q + k * k
    high_b = np.array([1.0, -2.0, 1.0])
    high_a = np.array([a0, 2.0 * (k * k - 1.0), 1.0 - k / _HIGHPASS_Q + k * k]) / a0
    return (shelf_b, shelf_a), (high_b, high_a)


@functools.lru_cache(maxsize=16)
def _k_weighting_spectrum(sample_rate: int, length: int) -> tuple[np.ndarray, int]:
    """rfft of the K-weighting impulse response for a linear convolution of `length` samples."""
    impulse = np.zeros(2 * sample_rate)
    impulse[0] = 1.0
    h = impulse
    for b, a in k_weighting(sample_rate):
        h = scipy.signal.lfilter(b, a, h)
    # The tail past 1e-10 of the peak sums to ~1e-8: far below float32 resolution.
    h = h[:np.nonzero(np.abs(h) > 1e-10 * np.abs(h).max())[0][-1] + 1]
    n_fft = 1 << (length + h.shape[0] - 2).bit_length()
    spectrum = np.fft.rfft(h, n_fft).astype(np.complex64)
    spectrum.setflags(write=False)
    return spectrum, n_fft


def k_weight(x: jax.Array, sample_rate: int) -> jax.Array:
    """Applies BS.1770 K-weighting along the last axis (zero initial state, like `lfilter`).

    The ~38 Hz high-pass has a double pole so close to z = 1 that running its recursion in
    float32, sequentially or as a parallel scan, loses up to 1e-2 relative accuracy. Its impulse
    response, computed once in float64 and cut where it falls below 1e-10, is applied instead as
    an FFT convolution: parallel, differentiable and accurate to float32 rounding.

    Args:
      x: float32 [..., time].
      sample_rate: sample rate in Hz.

    Returns:
      K-weighted audio, [..., time].
    """
    spectrum, n_fft = _k_weighting_spectrum(int(sample_rate), x.shape[-1])
    return _fft_filter(x, spectrum, n_fft)


def _fft_filter(x: jax.Array, spectrum: jax.Array, n_fft: int) -> jax.Array:
    y = jnp.fft.irfft(jnp.fft.rfft(x, n_fft, axis=-1) * spectrum, n_fft, axis=-1)
    return y[..., :x.shape[-1]].astype(x.dtype)


def _block_power(z: jax.Array, sample_rate: int) -> jax.Array:
    """Mean square of 400 ms blocks every 100 ms: [..., time] -> [..., blocks]."""
    block, step = round(_BLOCK_S * sample_rate), round(_STEP_S * sample_rate)
    length = z.shape[-1]
    if length < block:
        # Shorter than one gating block: the whole signal is the only block.
        return jnp.mean(z, axis=-1, keepdims=True)
    n_blocks = 1 + (length - block) // step
    csum = jnp.pad(jnp.cumsum(z, axis=-1), [(0, 0)] * (z.ndim - 1) + [(1, 0)])
    starts = np.arange(n_blocks) * step
    return (csum[..., starts + block] - csum[..., starts]) / block


def _to_channels_time(x: jax.Array, axis: int, channel_axis: int | None) -> jax.Array:
    if channel_axis is None:
        return jnp.moveaxis(x, axis, -1)
    if axis % x.ndim == channel_axis % x.ndim:
        raise ValueError(f"axis={axis} and channel_axis={channel_axis} name the same axis; "
                         "give the time axis and the channel axis of the audio")
    return jnp.moveaxis(x, (channel_axis, axis), (-2, -1))


def loudness_lufs(x: jax.Array, sample_rate: int, axis: int = -1,
                  channel_axis: int | None = None) -> jax.Array:
    """Gated integrated loudness of ITU-R BS.1770-4 in LUFS (LKFS).

    A 1 kHz sine of peak amplitude A measures `20 log10(A) - 3.01` LUFS (BS.1770's calibration:
    -3.01 LUFS at full scale). Silence, or audio quieter than the absolute gate throughout,
    measures -inf. Audio shorter than one 400 ms block is measured as a single block.

    Args:
      x: real audio with time on `axis`, e.g. [time], [batch, time], or [time, channels] with
        `axis=0, channel_axis=1`.
      sample_rate: sample rate in Hz (static).
      axis: time axis.
      channel_axis: axis holding up to 5 channels in the order L, R, C, Ls, Rs (no LFE), summed
        with BS.1770's weights; None measures every signal as mono.

    Returns:
      float32 loudness with the time (and channel) axes removed.
    """
    x = _to_channels_time(jnp.asarray(x, jnp.float32), axis, channel_axis)
    if x.shape[-1] == 0:
        raise ValueError("cannot measure the loudness of 0 samples; pass non-empty audio")
    weights = None
    if channel_axis is not None:
        channels = x.shape[-2]
        if channels > len(_CHANNEL_WEIGHTS):
            raise ValueError(f"loudness of {channels} channels is not defined here; pass at most "
                             "5 channels (L, R, C, Ls, Rs) without the LFE")
        weights = np.asarray(_CHANNEL_WEIGHTS[:channels], np.float32)
    spectrum, n_fft = _k_weighting_spectrum(int(sample_rate), x.shape[-1])
    return _gated_loudness_jit(x, spectrum, weights, n_fft=n_fft, sample_rate=int(sample_rate))


@functools.partial(jax.jit, static_argnames=("n_fft", "sample_rate"))
def _gated_loudness_jit(x, spectrum, weights, n_fft, sample_rate):
    power = _block_power(_fft_filter(x, spectrum, n_fft) ** 2, sample_rate)
    if weights is not None:
        power = jnp.einsum("...cb,c->...b", power, weights)
    block_lufs = -0.691 + 10.0 * jnp.log10(jnp.maximum(power, 1e-30))

    def gated_loudness(mask):
        count = jnp.sum(mask, axis=-1)
        mean = jnp.sum(jnp.where(mask, power, 0.0), axis=-1) / jnp.maximum(count, 1)
        value = -0.691 + 10.0 * jnp.log10(jnp.maximum(mean, 1e-30))
        return jnp.where(count > 0, value, -jnp.inf)

    above_absolute = block_lufs > _ABSOLUTE_GATE_LUFS
    relative_gate = gated_loudness(above_absolute) + _RELATIVE_GATE_LU
    return gated_loudness(above_absolute & (block_lufs > relative_gate[..., None]))


def loudness_normalize(x: jax.Array, sample_rate: int, target_lufs: float = -23.0,
                       axis: int = -1, channel_axis: int | None = None) -> jax.Array:
    """Scales each signal to `target_lufs` integrated loudness; silent signals are unchanged.

    Args:
      x: real audio, time on `axis` (channels on `channel_axis`), as in `loudness_lufs`.
      sample_rate: sample rate in Hz.
      target_lufs: loudness to reach.
      axis: time axis.
      channel_axis: axis of x holding channels, or None for mono signals.

    Returns:
      scaled audio, same shape as x (peaks may exceed 1; follow with `peak_normalize` to bound).
    """
    x = jnp.asarray(x)
    lufs = loudness_lufs(x, sample_rate, axis, channel_axis)
    reduced = {axis % x.ndim} | ({channel_axis % x.ndim} if channel_axis is not None else set())
    return _apply_gain(x, lufs, target_lufs, tuple(sorted(reduced)))


@functools.partial(jax.jit, static_argnums=(3,))
def _apply_gain(x, lufs, target_lufs, reduced_axes):
    lufs = jax.lax.stop_gradient(lufs)
    gain = jnp.where(jnp.isfinite(lufs), 10.0 ** ((target_lufs - lufs) / 20.0), 1.0)
    return x * jnp.expand_dims(gain, reduced_axes).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("axis",))
def peak_normalize(x: jax.Array, peak_db: float = -1.0, axis=-1) -> jax.Array:
    """Scales `x` so that `max |x|` over `axis` is `peak_db` dBFS; all-zero slices are unchanged.

    Args:
      x: real audio, any shape.
      peak_db: target peak in dB relative to full scale (1.0).
      axis: axis or tuple of axes over which the peak is taken (static).

    Returns:
      scaled audio, same shape as x.
    """
    x = jnp.asarray(x)
    peak = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    safe = jnp.where(peak > 0, peak, 1.0)
    gain = jnp.where(peak > 0, 10.0 ** (peak_db / 20.0) / safe, 1.0)
    return x * gain.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("axis",))
def rms_db(x: jax.Array, axis=-1, amin: float = 1e-5) -> jax.Array:
    """RMS level `20 log10(sqrt(mean(x^2)))` in dBFS, floored at `20 log10(amin)`.

    Args:
      x: real audio, any shape.
      axis: axis or tuple of axes averaged over (static).
      amin: amplitude floor (the default floors silence at -100 dB).

    Returns:
      level in dB with `axis` removed.
    """
    x = jnp.asarray(x)
    return 10.0 * jnp.log10(jnp.maximum(jnp.mean(x * x, axis=axis), amin * amin))
