"""Band-limited resampling between static integer rates by a Kaiser-windowed sinc, polyphase.

The interpolator is the ideal band-limited one of Smith's "Digital Audio Resampling Home Page"
(J. O. Smith, CCRMA, bandlimited interpolation), truncated by a Kaiser window as in resampy
(McFee, "resampy: efficient sample rate conversion in Python", JOSS 2016) and soxr. Rates are
reduced by their gcd to `up / down`; output sample `n` sits at input time `n * down / up`, so
within a block of `up` consecutive outputs the filter phases repeat. Each block is a weighted sum
of `down + 2K` input samples, which makes the whole resampler one stride-1 convolution over the
signal cut into `down`-sample blocks (`down` input channels, `up` output channels): dense work,
no `T x T` matrix, identical under `jit`, `vmap` and `grad`.

Filter: cutoff at `_ROLLOFF` of the lower Nyquist frequency, `_NUM_ZEROS` sinc zero crossings on
each side, Kaiser beta `_BETA`. Measured on sines: content up to 0.9 of the lower Nyquist frequency
passes with about 106 dB SNR (float32 rounding), content from 1.02 times the new Nyquist frequency
up is attenuated by more than 100 dB; soxr's 'VHQ' agrees to 68 dB or better.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_NUM_ZEROS = 64
_ROLLOFF = 0.955
_BETA = 10.0


def _check_rate(name: str, rate) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise ValueError(f"{name}={rate!r} must be a positive integer sample rate in Hz")
    return int(rate)


@functools.lru_cache(maxsize=32)
def polyphase_filter(orig_sr: int, target_sr: int) -> tuple[np.ndarray, int, int, int]:
    """The resampling filter as a block matrix.

    Args:
      orig_sr: input rate in Hz.
      target_sr: output rate in Hz.

    Returns:
      (weights float32 [down + 2K, up], K, up, down): output `m * up + q` is
      `sum_d x[m * down - K + d] * weights[d, q]`.
    """
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    # Cycles per input sample; when downsampling the cutoff follows the output Nyquist.
    cutoff = 0.5 * _ROLLOFF * min(1.0, up / down)
    half = _NUM_ZEROS / (2.0 * cutoff)
    k = int(math.ceil(half))
    d = np.arange(-k, down + k)
    q = np.arange(up)
    # Integer numerator keeps the filter phases exact for large up and down.
    t = (q[None, :] * down - d[:, None] * up) / up
    ratio = np.clip(t / half, -1.0, 1.0)
    window = np.i0(_BETA * np.sqrt(1.0 - ratio ** 2)) / np.i0(_BETA)
    h = 2.0 * cutoff * np.sinc(2.0 * cutoff * t) * np.where(np.abs(t) < half, window, 0.0)
    h = h.astype(np.float32)
    h.setflags(write=False)
    return h, k, up, down


def output_length(length: int, orig_sr: int, target_sr: int) -> int:
    """`ceil(length * target_sr / orig_sr)`, the number of samples `resample` returns."""
    return -(-length * target_sr // orig_sr)


def _plan(length: int, orig_sr: int, target_sr: int):
    h, k, up, down = polyphase_filter(orig_sr, target_sr)
    n_out = output_length(length, orig_sr, target_sr)
    n_blocks_out = -(-n_out // up)
    taps = h.shape[0]
    r = -(-taps // down)
    n_blocks_in = n_blocks_out + r - 1
    right = n_blocks_in * down - k - length
    return h, k, up, down, n_out, n_blocks_out, r, right


def resample(x: jax.Array, orig_sr: int, target_sr: int, axis: int = -1) -> jax.Array:
    """Band-limited resampling of `x` along `axis` from `orig_sr` to `target_sr`.

    The signal is taken as zero outside its support, so the first and last ~64 output
    periods feel the edges.

    Args:
      x: real audio, time on `axis`, any other axes.
      orig_sr: input sample rate, a static positive integer.
      target_sr: output sample rate, a static positive integer.
      axis: time axis.

    Returns:
      float32 (float64 if x is) with `ceil(time * target_sr / orig_sr)` samples on `axis`.
    """
    orig_sr, target_sr = _check_rate("orig_sr", orig_sr), _check_rate("target_sr", target_sr)
    x = jnp.asarray(x)
    if x.dtype not in (jnp.float32, jnp.float64):
        # Half precision cannot hold the filter's 100 dB stop-band.
        x = x.astype(jnp.float32)
    if orig_sr == target_sr:
        return x
    x = jnp.moveaxis(x, axis, -1)
    if x.shape[-1] == 0:
        raise ValueError("cannot resample audio of 0 samples; check the clip was read correctly")
    h, k, up, down, n_out, n_blocks_out, r, right = _plan(x.shape[-1], orig_sr, target_sr)
    kernel = np.pad(h, [(0, r * down - h.shape[0]), (0, 0)]).reshape(r, down, up)
    y = _polyphase_jit(x, kernel, k=k, right=right, n_out=n_out)
    return jnp.moveaxis(y, -1, axis)


@functools.partial(jax.jit, static_argnames=("k", "right", "n_out"))
def _polyphase_jit(x, kernel, k, right, n_out):
    r, down, up = kernel.shape
    lead, length = x.shape[:-1], x.shape[-1]
    n_blocks_out = -(-n_out // up)
    x = x.reshape(-1, length)
    x = jnp.pad(x, [(0, 0), (k, max(right, 0))])[:, :(n_blocks_out + r - 1) * down]
    blocks = x.reshape(x.shape[0], n_blocks_out + r - 1, down)
    y = jax.lax.conv_general_dilated(
        blocks, kernel.astype(x.dtype), window_strides=(1,), padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"), precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, n_blocks_out * up)[..., :n_out]

def resample_numpy(x: np.ndarray, orig_sr: int, target_sr: int, axis: int = -1) -> np.ndarray:
    """`resample` in NumPy (same filter, same output), for data loaders that must not touch JAX.

    Args:
      x: real audio, time on `axis`.
      orig_sr: input sample rate in Hz.
      target_sr: output sample rate in Hz.
      axis: time axis.

    Returns:
      float32 array with `ceil(time * target_sr / orig_sr)` samples on `axis`.
    """
    orig_sr, target_sr = _check_rate("orig_sr", orig_sr), _check_rate("target_sr", target_sr)
    x = np.asarray(x, np.float32)
    if orig_sr == target_sr:
        return x
    x = np.moveaxis(x, axis, -1)
    lead, length = x.shape[:-1], x.shape[-1]
    if length == 0:
        raise ValueError("cannot resample audio of 0 samples; check the clip was read correctly")
    h, k, up, down, n_out, n_blocks_out, r, right = _plan(length, orig_sr, target_sr)
    x = np.pad(x.reshape(-1, length), [(0, 0), (k, max(right, 0))])
    frames = np.lib.stride_tricks.sliding_window_view(x, h.shape[0], axis=-1)
    frames = frames[:, ::down][:, :n_blocks_out]
    y = np.matmul(frames, h).reshape(*lead, n_blocks_out * up)[..., :n_out]
    return np.ascontiguousarray(np.moveaxis(y, -1, axis))
