"""STFT, iSTFT, mel filterbanks and decibel scales against librosa; jit, vmap and grad."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from ldm_jax.audio import dsp
from ldm_jax.audio.framing import frame, overlap_add


def _rel_err(got, ref):
    """Max absolute error over max absolute reference value (relative, scale-free)."""
    return float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def signal():
    """Noise plus tones: every mel band holds energy, so log scales stay well conditioned."""
    rng = np.random.default_rng(0)
    t = np.arange(6000) / 16000.0
    tones = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 1375.0, 4100.0))
    return (0.1 * rng.standard_normal(6000) + 0.3 * tones).astype(np.float32)


@pytest.mark.parametrize("n_fft,hop,win_length,window,center,pad_mode", [
    (512, 128, None, "hann", True, "reflect"),
    (400, 160, 300, "hann", True, "constant"),
    (256, 100, 255, "hann", False, "reflect"),
    (256, 2, None, "hann", True, "reflect"),   # 128 slices per frame: the gather path
    (512, 512, None, "boxcar", True, "constant"),  # one slice per frame, scipy window
    (300, 75, 200, ("tukey", 0.5), True, "reflect"),
])
def test_stft_matches_librosa_and_inverts(signal, n_fft, hop, win_length, window, center,
                                          pad_mode):
    ref = librosa.stft(signal, n_fft=n_fft, hop_length=hop, win_length=win_length,
                       window=window, center=center, pad_mode=pad_mode).T
    spec = dsp.stft(signal, n_fft, hop, win_length, window, center=center, pad_mode=pad_mode)
    assert spec.shape == ref.shape and spec.dtype == jnp.complex64
    assert _rel_err(spec, ref) < 1e-5

    n_frames = spec.shape[0]
    length = len(signal) if center else None
    y = np.asarray(dsp.istft(spec, hop, win_length, n_fft, window, center=center,
                             length=length))
    # librosa's output length; without `length`, the span the frames cover.
    assert y.shape == ((len(signal),) if center else (n_fft + hop * (n_frames - 1),))
    # Samples that some frame's window covers come back to float32 rounding; with centring the
    # first frame is centred on sample 0, without it the first and last hop see a near-zero
    # window sum, so they are left out.
    start = 0 if center else n_fft
    stop = min(len(signal), (n_frames - 1) * hop + n_fft - (n_fft // 2 if center else n_fft))
    assert np.max(np.abs(y[start:stop] - signal[start:stop])) < 1e-5  # absolute, peak ~1


def test_istft_length_crops_and_pads(signal):
    spec = dsp.stft(signal, 256, 64)
    short = dsp.istft(spec, 64, length=1000)
    long = dsp.istft(spec, 64, length=len(signal) + 300)
    np.testing.assert_allclose(short, signal[:1000], atol=1e-5)
    np.testing.assert_allclose(long[:len(signal)], signal, atol=1e-5)
    assert np.all(np.asarray(long[len(signal) + 200:]) == 0.0)


def test_frame_and_overlap_add_are_adjoint():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 301)), jnp.float32)
    frame_jit = jax.jit(frame, static_argnums=(1, 2, 3))
    overlap_add_jit = jax.jit(overlap_add, static_argnums=(1,))
    for length, hop in ((37, 13), (37, 37), (100, 1), (16, 40)):
        n = 1 + (x.shape[-1] - length) // hop
        fr = frame_jit(x, length, hop, n)
        idx = np.arange(n)[:, None] * hop + np.arange(length)
        np.testing.assert_array_equal(fr, np.asarray(x)[:, idx])
        # <frame(x), f> == <x, overlap_add(f)> over the span the frames cover.
        f = jnp.asarray(rng.standard_normal((2, n, length)), jnp.float32)
        ola = overlap_add_jit(f, hop)
        assert ola.shape == (2, (n - 1) * hop + length)
        np.testing.assert_allclose(jnp.sum(fr * f), jnp.sum(x[:, :ola.shape[-1]] * ola),
                                   rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Empty filters detected")
@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax,htk,norm", [
    (16000, 512, 80, 0.0, None, False, "slaney"),
    (22050, 1024, 128, 30.0, 8000.0, True, None),
    (44100, 2048, 64, 20.0, 16000.0, False, None),
    (24000, 400, 100, 0.0, 12000.0, True, "slaney"),
    (48000, 1024, 40, 50.0, None, False, "slaney"),
])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax, htk, norm):
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk,
                              norm=norm).T
    fb = dsp.mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk, norm)
    assert fb.shape == (n_fft // 2 + 1, n_mels) and fb.dtype == np.float32
    np.testing.assert_allclose(fb, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sr,n_fft,hop,n_mels,fmin,fmax,htk,power,pad_mode", [
    (16000, 512, 128, 80, 0.0, None, False, 2.0, "reflect"),
    (22050, 1024, 256, 64, 30.0, 8000.0, True, 2.0, "constant"),
    (24000, 400, 100, 40, 20.0, 11000.0, False, 1.0, "reflect"),
    (44100, 2048, 512, 128, 0.0, None, True, 2.0, "constant"),
])
def test_melspectrogram_and_db_match_librosa(signal, sr, n_fft, hop, n_mels, fmin, fmax, htk,
                                             power, pad_mode):
    ref = librosa.feature.melspectrogram(y=signal, sr=sr, n_fft=n_fft, hop_length=hop,
                                         n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk,
                                         power=power, pad_mode=pad_mode)
    mel = dsp.melspectrogram(signal, sr, n_fft, hop, n_mels=n_mels, fmin=fmin, fmax=fmax,
                             htk=htk, power=power, pad_mode=pad_mode)
    assert mel.shape == ref.T.shape
    assert _rel_err(mel, ref.T) < 1e-5  # relative: max abs error / max value

    # Absolute in dB over the full 80 dB range; float32 FFT rounding of the quietest bands
    # bounds it (measured <= 1.4e-4 dB).
    db_ref = librosa.power_to_db(ref, ref=np.max).T
    db = dsp.power_to_db(mel, ref=jnp.max)
    assert float(jnp.max(jnp.abs(db - db_ref))) < 1e-3
    amp_ref = librosa.amplitude_to_db(ref, ref=1.0, top_db=None).T
    assert float(jnp.max(jnp.abs(dsp.amplitude_to_db(mel, top_db=None) - amp_ref))) < 1e-3

    log = dsp.log_mel(signal, sr, n_fft, hop, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk,
                      power=power, pad_mode=pad_mode)
    log_ref = np.log10(np.maximum(ref.T, 1e-5))
    assert float(jnp.max(jnp.abs(log - log_ref))) < 1e-4  # absolute, log10 units


def test_power_to_db_floors():
    s = jnp.asarray([1e-14, 1e-6, 1.0, 100.0])
    db = dsp.power_to_db(s, ref=1.0, amin=1e-10, top_db=80.0)
    np.testing.assert_allclose(db, [-60.0, -60.0, 0.0, 20.0], atol=1e-5)
    np.testing.assert_allclose(dsp.power_to_db(s, top_db=None)[0], -100.0, atol=1e-5)


@pytest.fixture(scope="module")
def mel_loss_fns():
    kwargs = dict(sample_rate=16000, n_fft=256, hop_length=64, n_mels=32, power=1.0)

    def loss(x, target):
        # Squared (smooth) so that a central difference can check the gradient.
        return jnp.mean((dsp.log_mel(x, **kwargs) - dsp.log_mel(target, **kwargs)) ** 2)

    return jax.jit(jax.value_and_grad(loss)), kwargs


def test_mel_loss_jit_vmap_grad(mel_loss_fns):
    value_and_grad, kwargs = mel_loss_fns
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 2048)) * 0.1, jnp.float32)
    target = jnp.asarray(rng.standard_normal((3, 2048)) * 0.1, jnp.float32)

    batched = jax.jit(lambda a: dsp.log_mel(a, **kwargs))(x)
    mapped = jax.jit(jax.vmap(lambda a: dsp.log_mel(a, **kwargs)))(x)
    assert batched.shape == (3, 2048 // 64 + 1, 32)
    np.testing.assert_allclose(batched, mapped, atol=1e-5)

    value, grad = value_and_grad(x, target)
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(value) > 0.0 and float(jnp.max(jnp.abs(grad))) > 0.0
    # Directional derivative against a central difference.
    direction = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    direction = direction / jnp.linalg.norm(direction)
    eps = 1e-2
    plus, _ = value_and_grad(x + eps * direction, target)
    minus, _ = value_and_grad(x - eps * direction, target)
    numeric = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=1e-2)

    # |X| at exact zeros: the gradient stays finite.
    _, grad0 = value_and_grad(jnp.zeros_like(x), target)
    assert bool(jnp.all(jnp.isfinite(grad0)))


def test_user_errors_are_clear():
    with pytest.raises(ValueError, match="too short to reflect-pad"):
        dsp.stft(jnp.zeros(100), 512, 128)
    with pytest.raises(ValueError, match="shorter than n_fft"):
        dsp.stft(jnp.zeros(100), 512, 128, center=False)
    with pytest.raises(ValueError, match="win_length=600 exceeds"):
        dsp.stft(jnp.zeros(1000), 512, 128, win_length=600)
    with pytest.raises(ValueError, match="norm"):
        dsp.mel_filterbank(16000, 512, norm="l2")
