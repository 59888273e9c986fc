"""GAN discriminators: DAC's layer structure, feature-map shapes, weight norm, finite gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import scipy.signal

from ldm_jax.codec import discriminators as D
from ldm_jax.codec import losses

SR = 16000
TINY = dict(periods=(2, 3), rates=(1, 2), fft_sizes=(64, 32), channels=4, max_channels=16,
            sample_rate=SR)


def _random_params(model, x, seed=0):
    """Parameters of the right shapes drawn with NumPy (skips compiling the init RNG)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.uniform(-1.0, 1.0, s.shape), s.dtype), shapes)


def test_feature_map_shapes_follow_dac_layers():
    x = jax.ShapeDtypeStruct((2, 300, 1), jnp.float32)
    model = D.Discriminator(**TINY)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, params, x)
    # Order as DAC: periods, then rates, then FFT sizes; each list ends with its logits.
    assert [len(o) for o in out] == [6, 6, 7, 7, 26, 26]
    shapes = [[tuple(f.shape) for f in o] for o in out]
    # MPD: 300 samples reflect-padded to 302 (303) and folded by 2 (3); (5, 1) convs, stride 3.
    assert shapes[0] == [(2, 51, 2, 4), (2, 17, 2, 16), (2, 6, 2, 16), (2, 2, 2, 16),
                         (2, 2, 2, 16), (2, 2, 2, 1)]
    assert shapes[1] == [(2, 34, 3, 4), (2, 12, 3, 16), (2, 4, 3, 16), (2, 2, 3, 16),
                         (2, 2, 3, 16), (2, 2, 3, 1)]
    # MSD at rate 2: 150 samples, then strides 1, 4, 4, 4, 4, 1.
    assert shapes[3] == [(2, 150, 2), (2, 38, 8), (2, 10, 16), (2, 3, 16), (2, 1, 16),
                         (2, 1, 16), (2, 1, 1)]
    # MRD at 64: ceil(300 / 16) = 19 frames, 33 bins in bands of 3, 5, 8, 8, 9 bins; each band
    # keeps its width, then halves it three times; the logits see the joined bands (1+1+1+1+2).
    band_widths = [(3, 2, 1, 1, 1), (5, 3, 2, 1, 1), (8, 4, 2, 1, 1), (8, 4, 2, 1, 1),
                   (9, 5, 3, 2, 2)]
    expected = [(2, 19, w, 4) for widths in band_widths for w in widths] + [(2, 19, 6, 1)]
    assert shapes[4] == expected
    assert shapes[5][-1] == (2, 38, 5, 1)
    # Channels are judged as separate examples.
    stereo = jax.ShapeDtypeStruct((1, 300, 2), jnp.float32)
    assert jax.eval_shape(model.apply, params, stereo)[0][-1].shape == (2, 2, 2, 1)


def _dac_parameter_count():
    """Parameters of DAC's default Discriminator: weight (in/groups*out*k) + bias + weight_g."""
    def count(layers):
        return sum(cin * cout * k + 2 * cout for cin, cout, k in layers)
    mpd = count([(1, 32, 5), (32, 128, 5), (128, 512, 5), (512, 1024, 5), (1024, 1024, 5),
                 (1024, 1, 3)])
    band = count([(2, 32, 27), (32, 32, 27), (32, 32, 27), (32, 32, 27), (32, 32, 9)])
    mrd = 5 * band + count([(32, 1, 9)])
    msd = count([(1, 16, 15), (4, 64, 41), (4, 256, 41), (4, 1024, 41), (4, 1024, 41),
                 (1024, 1024, 5), (1024, 1, 3)])
    return mpd, mrd, msd


def test_default_configuration_has_dacs_parameter_count():
    mpd, mrd, msd = _dac_parameter_count()
    x = jax.ShapeDtypeStruct((1, 4096, 1), jnp.float32)
    params = jax.eval_shape(D.Discriminator().init, jax.random.key(0), x)
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == 5 * mpd + 3 * mrd
    assert 5 * mpd + 3 * mrd == 42_519_760
    with_msd = D.Discriminator(rates=(1, 2, 4))
    params = jax.eval_shape(with_msd.init, jax.random.key(0), x)
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == 5 * mpd + 3 * mrd + 3 * msd


def test_norm_conv_is_weight_normalised_and_matches_flax_conv():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 11, 6, 4)), jnp.float32)
    conv = D.NormConv(8, (3, 5), (1, 2), ((1, 1), (2, 2)), groups=2)
    params = nn.meta.unbox(conv.init(jax.random.key(1), x))["params"]
    assert set(params) == {"weight_v", "weight_g", "bias"}
    assert params["weight_v"].shape == (3, 5, 2, 8)
    # torch's weight_norm starts with g = ||v||: the effective kernel starts as the stored one.
    norms = jnp.sqrt(jnp.sum(params["weight_v"] ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(params["weight_g"], norms, rtol=1e-6)
    reference = nn.Conv(8, (3, 5), (1, 2), ((1, 1), (2, 2)), feature_group_count=2)
    expected = reference.apply({"params": {"kernel": params["weight_v"], "bias": params["bias"]}},
                               x)
    y = conv.apply({"params": params}, x)
    assert y.shape == (2, 11, 3, 8)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    # Only the direction of the stored kernel matters.
    rescaled = dict(params, weight_v=3.0 * params["weight_v"])
    np.testing.assert_allclose(conv.apply({"params": rescaled}, x), y, atol=1e-5)
    plain = D.NormConv(8, (3, 5), (1, 2), ((1, 1), (2, 2)), groups=2, weight_norm=False)
    assert "weight_g" not in plain.init(jax.random.key(1), x)["params"]


def test_stride_matched_stft_matches_audiotools():
    x = np.random.default_rng(0).standard_normal((2, 300)).astype(np.float32)
    window, hop = 64, 16
    got = np.asarray(jax.jit(D._stride_matched_stft, static_argnums=(1, 2))(x, window, hop))
    # audiotools' stft(match_stride=True): pad (window - hop) / 2 each side plus the remainder
    # to a whole hop on the right, torch.stft(center=True), drop two frames at each end.
    right = int(np.ceil(300 / hop)) * hop - 300
    pad = (window - hop) // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad + right)), mode="reflect")
    spec = librosa.stft(padded, n_fft=window, hop_length=hop,
                        window=scipy.signal.get_window("hann", window), center=True,
                        pad_mode="reflect")[..., 2:-2]
    expected = np.swapaxes(spec, -1, -2)
    assert got.shape == expected.shape == (2, 19, 33)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_preprocess_removes_dc_and_peak_normalises():
    x = np.array([[[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]]], np.float32)
    y = np.asarray(D.preprocess(x))
    np.testing.assert_allclose(y[0, :, 0], [-0.8, 0.8, 0.0], atol=1e-6)
    np.testing.assert_array_equal(y[0, :, 1], 0.0)  # silence stays silent
    # So the discriminator cannot tell gain or DC offset apart.
    x = np.random.default_rng(1).standard_normal((2, 50, 1)).astype(np.float32)
    np.testing.assert_allclose(D.preprocess(2.5 * x + 0.1), D.preprocess(x), atol=1e-6)


def test_forward_and_gan_gradients_are_finite():
    model = D.Discriminator(periods=(2,), rates=(2,), fft_sizes=(32,),
                            bands=((0.0, 0.5), (0.5, 1.0)), channels=4, max_channels=8,
                            sample_rate=SR)
    rng = np.random.default_rng(2)
    real = rng.standard_normal((2, 256, 1)).astype(np.float32)
    fake = (0.5 * real + 0.3 * rng.standard_normal(real.shape)).astype(np.float32)
    params = _random_params(model, jax.ShapeDtypeStruct(real.shape, jnp.float32))

    def total(params, fake):
        # Both players' losses at once: one backward pass reaches every parameter and the audio.
        d_fake, d_real = model.apply(params, fake), model.apply(params, real)
        loss = (losses.lsgan_discriminator_loss(d_fake, d_real)
                + losses.lsgan_generator_loss(d_fake)
                + 2.0 * losses.feature_matching_loss(d_fake, d_real))
        return loss, d_fake

    (loss, d_fake), (g_params, g_audio) = jax.jit(
        jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(params, fake)
    assert [len(o) for o in d_fake] == [6, 7, 11]
    assert all(bool(jnp.all(jnp.isfinite(f))) for f in jax.tree_util.tree_leaves(d_fake))
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves(g_params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)  # every parameter is used
    assert g_audio.shape == fake.shape
    assert bool(jnp.all(jnp.isfinite(g_audio))) and float(jnp.max(jnp.abs(g_audio))) > 0


def test_too_short_audio_is_a_clear_error():
    model = D.Discriminator(periods=(), fft_sizes=(2048,), channels=4)
    with pytest.raises(ValueError, match="too short"):
        model.init(jax.random.key(0), jnp.zeros((1, 500, 1)))
    with pytest.raises(ValueError, match=r"\[batch, time, channels\]"):
        model.init(jax.random.key(0), jnp.zeros((1, 500)))
