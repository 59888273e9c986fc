"""Band-limited resampling: accuracy against analytic sines and soxr, stop-band, NumPy twin."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soxr

from ldm_jax.audio import dsp
from ldm_jax.audio.resample import output_length, polyphase_filter

RATES = (16000, 22050, 24000, 32000, 44100, 48000)
PAIRS = [(a, b) for a, b in itertools.product(RATES, RATES) if a != b]


def _tones(sr: int, freqs, n: int) -> np.ndarray:
    t = np.arange(n) / sr
    return sum(np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs)) / len(freqs)


def _snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((est - ref) ** 2)))


@pytest.mark.parametrize("orig,target", PAIRS)
def test_band_limited_sines_survive_every_direction(orig, target):
    low = min(orig, target)
    # Up to 0.45 of the lower rate: 0.9 of its Nyquist frequency.
    freqs = (0.45 * low, 0.41 * low, 0.3 * low, 0.05 * low)
    x = _tones(orig, freqs, orig // 5).astype(np.float32)
    y = np.asarray(dsp.resample(x, orig, target))
    assert y.shape == (output_length(len(x), orig, target),) == (-(-len(x) * target // orig),)
    ref = _tones(target, freqs, len(y))
    edge = 100 * target // low  # the filter's half-length at the output rate, with margin
    inner = slice(edge, len(y) - edge)
    assert _snr_db(ref[inner], y[inner]) > 90.0  # measured ~106 dB (float32 rounding)

    s = soxr.resample(x, orig, target, "VHQ")
    n = min(len(s), len(y))
    # soxr's own passband ends near 0.91 of Nyquist, so it bounds this (measured >= 67.9 dB).
    assert _snr_db(s[edge:n - edge], y[edge:n - edge]) > 60.0

    np.testing.assert_allclose(dsp.resample_numpy(x, orig, target), y, atol=2e-6)


@pytest.mark.parametrize("orig,target", [(a, b) for a, b in PAIRS if b < a])
def test_content_above_new_nyquist_is_removed(orig, target):
    # From 1.05 x the new Nyquist frequency to 0.95 x the old one, in one batched call.
    freqs = np.linspace(0.525 * target, 0.475 * orig, 8)
    x = np.sin(2 * np.pi * freqs[:, None] * np.arange(orig // 5) / orig).astype(np.float32)
    y = np.asarray(dsp.resample(x, orig, target))
    edge = 100
    attenuation = 10 * np.log10(np.mean(x ** 2, -1) / np.mean(y[:, edge:-edge] ** 2, -1))
    assert np.min(attenuation) > 90.0  # measured > 101 dB


def test_axis_jit_vmap_grad_and_identity():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4410, 3)), jnp.float32)  # [batch, time, channels]
    fn = jax.jit(lambda a: dsp.resample(a, 44100, 16000, axis=1))
    y = fn(x)
    assert y.shape == (2, 1600, 3)
    per_channel = jax.vmap(lambda a: dsp.resample(a, 44100, 16000), in_axes=-1, out_axes=-1)
    np.testing.assert_allclose(jax.vmap(per_channel)(x), y, atol=1e-6)
    np.testing.assert_allclose(dsp.resample_numpy(np.asarray(x), 44100, 16000, axis=1), y,
                               atol=2e-6)

    # The resampler is linear: its gradient is the transposed filter, finite and non-zero.
    g = jax.grad(lambda a: jnp.sum(fn(a) ** 2))(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(jnp.vdot(g, x), 2 * jnp.sum(y ** 2), rtol=1e-4)

    np.testing.assert_array_equal(dsp.resample(x, 24000, 24000, axis=1), x)


def test_filter_is_compact_and_rates_are_checked():
    h, k, up, down = polyphase_filter(44100, 48000)
    assert (up, down) == (160, 147)
    assert h.shape == (down + 2 * k, up)  # not a [T, T] matrix
    # Unit DC gain in every output phase.
    np.testing.assert_allclose(h.sum(axis=0), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="positive integer"):
        dsp.resample(jnp.zeros(10), 44100.0, 16000)
    with pytest.raises(ValueError, match="positive integer"):
        dsp.resample(jnp.zeros(10), 44100, 0)
