"""Codec losses against step-by-step NumPy/librosa versions of DAC's and audiotools' definitions."""

import functools
import warnings

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import scipy.signal

from ldm_jax.codec import losses

SR = 16000


def _test_signal(n, seed):
    """The shared fixtures' test signal: tones, a chirp and a little noise."""
    t = np.arange(n) / SR
    x = (0.25 * np.sin(2 * np.pi * 220 * t) + 0.15 * np.sin(2 * np.pi * 587.33 * t + 0.5)
         + 0.10 * np.sin(2 * np.pi * 1500 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
         + 0.08 * np.sin(2 * np.pi * (100 * t + 2000 * t ** 2))
         + 0.05 * np.random.default_rng(seed).standard_normal(n))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    """(estimate, reference) [2, 2400, 1]: the estimate is low-passed, attenuated and noisy."""
    ref = np.stack([_test_signal(2400, 1), _test_signal(2400, 2)])[..., None]
    b, a = scipy.signal.butter(4, 3000, fs=SR)
    est = 0.8 * scipy.signal.lfilter(b, a, ref, axis=1)
    est = est + 0.01 * np.random.default_rng(3).standard_normal(ref.shape)
    return est.astype(np.float32), ref


def _magnitude_np(x, window_length):
    """audiotools' |STFT|: periodic Hann, hop window/4, centred with reflect padding; float64."""
    x = np.swapaxes(np.asarray(x, np.float64), 1, 2)  # [B, C, T], as audiotools holds audio
    window = scipy.signal.get_window("hann", window_length)
    spec = librosa.stft(x, n_fft=window_length, hop_length=window_length // 4,
                        win_length=window_length, window=window, center=True, pad_mode="reflect")
    return np.abs(spec)  # [B, C, freq, frames]


def _mel_loss_np(est, ref, windows, n_mels, clamp_eps=1e-5, mag_weight=0.0, log_weight=1.0,
                 power=1.0, fmin=None, fmax=None):
    """DAC's MelSpectrogramLoss.forward, step by step."""
    fmin = fmin or [0.0] * len(windows)
    fmax = fmax or [None] * len(windows)
    loss = 0.0
    for w, m, lo, hi in zip(windows, n_mels, fmin, fmax):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # librosa warns about empty filters at tiny n_fft
            basis = librosa.filters.mel(sr=SR, n_fft=w, n_mels=m, fmin=lo, fmax=hi,
                                        dtype=np.float64)
        mels = [np.einsum("mf,bcft->bcmt", basis, _magnitude_np(s, w)) for s in (est, ref)]
        logs = [np.log10(np.maximum(s, clamp_eps) ** power) for s in mels]
        loss += log_weight * np.mean(np.abs(logs[0] - logs[1]))
        loss += mag_weight * np.mean(np.abs(mels[0] - mels[1]))
    return loss


def _stft_loss_np(est, ref, windows=(2048, 512), clamp_eps=1e-5, mag_weight=1.0,
                  log_weight=1.0, power=2.0):
    """DAC's MultiScaleSTFTLoss.forward, step by step."""
    loss = 0.0
    for w in windows:
        mags = [_magnitude_np(s, w) for s in (est, ref)]
        logs = [np.log10(np.maximum(s, clamp_eps) ** power) for s in mags]
        loss += log_weight * np.mean(np.abs(logs[0] - logs[1]))
        loss += mag_weight * np.mean(np.abs(mags[0] - mags[1]))
    return loss


def test_mel_loss_matches_dac_definition(pair):
    est, ref = pair
    mel = jax.jit(functools.partial(losses.mel_loss, sample_rate=SR))
    expected = _mel_loss_np(est, ref, losses.MEL_WINDOW_LENGTHS, losses.MEL_N_MELS)
    got = float(mel(est, ref))
    assert got == pytest.approx(expected, rel=2e-5)
    assert 0.1 < got < 10.0
    # Rows of one batched FFT may round differently, so identical inputs give ~1e-7, not 0.
    assert float(mel(ref, ref)) == pytest.approx(0.0, abs=1e-5)


def test_mel_loss_options_and_stereo_match_dac_definition(pair):
    est, ref = pair
    # Two channels of one example: [1, time, 2].
    est, ref = (np.moveaxis(a[..., 0], 0, -1)[None] for a in (est, ref))
    options = dict(n_mels=(40, 10), mag_weight=1.0, log_weight=0.5, power=2.0,
                   fmin=(50.0, 0.0), fmax=(6000.0, None))
    got = jax.jit(functools.partial(losses.mel_loss, sample_rate=SR, window_lengths=(256, 64),
                                    **options))(est, ref)
    expected = _mel_loss_np(est, ref, (256, 64), **options)
    assert float(got) == pytest.approx(expected, rel=2e-5)


def test_multiscale_stft_loss_matches_dac_definition(pair):
    est, ref = pair
    got = jax.jit(losses.multiscale_stft_loss)(est, ref)
    assert float(got) == pytest.approx(_stft_loss_np(est, ref), rel=2e-5)


def test_spectral_loss_gradients_are_finite(pair):
    est, ref = pair
    est = est.copy()
    est[:, :600] = 0.0  # silence: zero STFT magnitudes must not give NaN gradients

    def total(e):
        return (losses.mel_loss(e, ref, SR, window_lengths=(64, 32), n_mels=(10, 5))
                + losses.multiscale_stft_loss(e, ref, window_lengths=(64,)))

    grad = jax.jit(jax.grad(total))(est)
    assert grad.shape == est.shape
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.max(jnp.abs(grad))) > 0.0


def test_spectral_losses_reject_bad_input():
    short = np.zeros((1, 1000, 1), np.float32)
    with pytest.raises(ValueError, match="too short"):
        losses.mel_loss(short, short, SR)  # the 2048 window needs more than 1024 samples
    with pytest.raises(ValueError, match="same length"):
        losses.multiscale_stft_loss(np.zeros((1, 3000, 1)), np.zeros((1, 3001, 1)))
    with pytest.raises(ValueError, match="one per window length"):
        losses.mel_loss(np.zeros((1, 3000)), np.zeros((1, 3000)), SR, n_mels=(5, 10))


def test_waveform_l1():
    est = np.array([[[0.5], [-1.0], [0.0]]], np.float32)
    ref = np.array([[[0.0], [1.0], [0.25]]], np.float32)
    assert float(losses.waveform_l1(est, ref)) == pytest.approx((0.5 + 2.0 + 0.25) / 3)


def _si_sdr_np(est, ref, scaling=True, zero_mean=True, eps=1e-8):
    """audiotools' SISDRLoss (before the sign flip), per example, in float64."""
    est = est.reshape(est.shape[0], -1).astype(np.float64)
    ref = ref.reshape(ref.shape[0], -1).astype(np.float64)
    if zero_mean:
        est = est - est.mean(1, keepdims=True)
        ref = ref - ref.mean(1, keepdims=True)
    proj = (ref ** 2).sum(1, keepdims=True) + eps
    dot = (est * ref).sum(1, keepdims=True) + eps
    target = (dot / proj if scaling else 1.0) * ref
    signal = (target ** 2).sum(1)
    noise = ((est - target) ** 2).sum(1)
    return 10 * np.log10(signal / noise + eps)


def test_level_loss_measures_frame_energy_in_bels():
    rng = np.random.default_rng(0)
    x = jnp.asarray(0.1 * rng.standard_normal((2, 4096, 1)), jnp.float32)
    assert float(losses.level_loss(x, x)) == 0.0
    # Half the amplitude: a quarter of the power, log10(4) bels in every frame.
    np.testing.assert_allclose(losses.level_loss(0.5 * x, x), np.log10(4.0), rtol=1e-4)
    # The level, not the waveform: a sign flip or a time-reversed frame costs nothing.
    assert float(losses.level_loss(-x, x)) < 1e-6
    flipped = x.reshape(2, 4, 1024, 1)[:, :, ::-1].reshape(2, 4096, 1)
    assert float(losses.level_loss(flipped, x)) < 1e-5
    # Channels are pooled; a stray tail shorter than a frame is left out.
    stereo = jnp.concatenate([x, x], axis=-1)
    np.testing.assert_allclose(losses.level_loss(0.5 * stereo[:, :4100], stereo[:, :4100]),
                               np.log10(4.0), rtol=1e-4)
    with pytest.raises(ValueError):
        losses.level_loss(x[:, :512], x[:, :512])


def test_si_sdr_matches_audiotools_definition():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 200, 2)).astype(np.float32) + 0.3
    est = (0.7 * ref + 0.4 * rng.standard_normal(ref.shape)).astype(np.float32)
    for kwargs in ({}, {"scaling": False}, {"zero_mean": False}):
        got = np.asarray(losses.si_sdr(est, ref, **kwargs))
        np.testing.assert_allclose(got, _si_sdr_np(est, ref, **kwargs), atol=1e-4)
    assert float(losses.si_sdr_loss(est, ref)) == pytest.approx(
        -_si_sdr_np(est, ref).mean(), abs=1e-4)


def test_si_sdr_known_values():
    n = np.arange(1000)
    ref = np.sin(2 * np.pi * 5 * n / 1000)[None, :, None]
    noise = np.cos(2 * np.pi * 7 * n / 1000)[None, :, None]  # orthogonal, same energy
    # A rescaled copy is perfect up to scale.
    assert float(losses.si_sdr(2.0 * ref, ref)[0]) > 80.0
    # Noise at 1/10 of the amplitude: 10 log10(1 / 0.1^2) = 20 dB, whatever the gain.
    est = 3.0 * (ref + 0.1 * noise)
    assert float(losses.si_sdr(est, ref)[0]) == pytest.approx(20.0, abs=1e-3)
    assert float(losses.si_sdr_loss(est, ref)) == pytest.approx(-20.0, abs=1e-3)
    assert float(losses.si_sdr_loss(est, ref, clip_min=-10.0)) == -10.0
    # Plain SDR is not gain invariant: target r, error 2r + 0.3 n -> 10 log10(1 / 4.09).
    sdr = losses.si_sdr(est, ref, scaling=False)[0]
    assert float(sdr) == pytest.approx(10 * np.log10(1 / 4.09), abs=1e-3)


def _maps():
    """Two sub-discriminators: (one feature map, logits) and (logits only)."""
    fake = [[jnp.array([[1.0, -1.0]]), jnp.array([[0.5], [-0.5]])],
            [jnp.array([[[2.0, 0.0]]])]]
    real = [[jnp.array([[0.0, 0.0]]), jnp.array([[1.0], [0.0]])],
            [jnp.array([[[1.5, -1.0]]])]]
    return fake, real


def test_lsgan_losses_hand_computed():
    fake, real = _maps()
    # D: mean(f^2) + mean((1 - r)^2) per discriminator.
    d1 = (0.25 + 0.25) / 2 + (0.0 + 1.0) / 2
    d2 = (4.0 + 0.0) / 2 + (0.25 + 4.0) / 2
    assert float(losses.lsgan_discriminator_loss(fake, real)) == pytest.approx(d1 + d2)
    assert float(losses.discriminator_loss(fake, real)) == pytest.approx(d1 + d2)
    # G: mean((1 - f)^2).
    g = (0.25 + 2.25) / 2 + (1.0 + 1.0) / 2
    assert float(losses.lsgan_generator_loss(fake)) == pytest.approx(g)
    assert float(losses.generator_adversarial_loss(fake)) == pytest.approx(g)


def test_hinge_losses_hand_computed():
    fake, real = _maps()
    # D: mean(relu(1 - r)) + mean(relu(1 + f)).
    d = ((0.0 + 1.0) / 2 + (1.5 + 0.5) / 2) + ((0.0 + 2.0) / 2 + (3.0 + 1.0) / 2)
    assert float(losses.hinge_discriminator_loss(fake, real)) == pytest.approx(d)
    assert float(losses.discriminator_loss(fake, real, "hinge")) == pytest.approx(d)
    # G: mean(relu(1 - f)).
    g = (0.5 + 1.5) / 2 + (0.0 + 1.0) / 2
    assert float(losses.hinge_generator_loss(fake)) == pytest.approx(g)
    assert float(losses.generator_adversarial_loss(fake, "hinge")) == pytest.approx(g)
    with pytest.raises(ValueError, match="lsgan"):
        losses.generator_adversarial_loss(fake, "wasserstein")


def test_feature_matching_hand_computed_and_real_side_held():
    fake, real = _maps()
    # Only the first discriminator has a feature map besides its logits: mean(|1|, |-1|) = 1.
    assert float(losses.feature_matching_loss(fake, real)) == pytest.approx(1.0)
    g_fake, g_real = jax.grad(losses.feature_matching_loss, argnums=(0, 1))(fake, real)
    np.testing.assert_allclose(g_fake[0][0], [[0.5, -0.5]])
    np.testing.assert_allclose(g_fake[0][1], 0.0)  # logits take no part
    for leaf in jax.tree_util.tree_leaves(g_real):
        np.testing.assert_array_equal(leaf, 0.0)


def test_weighted_total_uses_dac_weights():
    assert losses.DEFAULT_LOSS_WEIGHTS["mel/loss"] == 15.0
    assert set(losses.DEFAULT_LOSS_WEIGHTS) == {
        "mel/loss", "adv/feat_loss", "adv/gen_loss", "vq/commitment_loss", "vq/codebook_loss",
        "kl/loss"}
    metrics = {"mel/loss": 2.0, "adv/gen_loss": 3.0, "vq/commitment_loss": 4.0,
               "waveform/loss": 100.0}  # not weighted: only logged
    assert float(losses.weighted_total(metrics)) == pytest.approx(15 * 2 + 3 + 0.25 * 4)
    assert float(losses.weighted_total(metrics, {"adv/gen_loss": 0.5})) == pytest.approx(1.5)
