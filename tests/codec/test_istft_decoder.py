"""The iSTFT (Vocos) decoder: its inversion against librosa, shapes, gradients and config."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from ldm_jax.codec import Codec, CodecConfig, init_variables, make_codec
from ldm_jax.codec.istft_decoder import advancing_phase, spectrum_to_audio
from ldm_jax.config import ConfigError

RNG = jax.random.key(0, impl="rbg")


def test_spectrum_inversion_matches_librosa():
    hop, n_fft, frames = 40, 160, 25
    rng = np.random.default_rng(0)
    head = np.concatenate([rng.normal(-2.0, 1.0, (2, frames, 1, n_fft // 2 + 1)),
                           rng.uniform(-9.0, 9.0, (2, frames, 1, n_fft // 2 + 1))], axis=-1)
    audio = spectrum_to_audio(jnp.asarray(head, jnp.float32), hop, n_fft)
    assert audio.shape == (2, frames * hop, 1)
    log_mag, phase = np.split(head, 2, axis=-1)
    spec = np.minimum(np.exp(log_mag), 100.0) * np.exp(1j * phase)
    for b in range(2):
        want = librosa.istft(spec[b, :, 0].T, hop_length=hop, n_fft=n_fft, window="hann",
                             center=True, length=frames * hop)
        np.testing.assert_allclose(audio[b, :, 0], want, atol=1e-5)


def test_a_sine_spectrum_comes_back_as_the_sine():
    hop, n_fft, sr = 40, 160, 16000
    t = np.arange(40 * hop) / sr
    x = 0.5 * np.sin(2 * np.pi * 500.0 * t)
    spec = librosa.stft(x, n_fft=n_fft, hop_length=hop, window="hann", center=True)[:, :40]
    head = np.concatenate([np.log(np.abs(spec) + 1e-12), np.angle(spec)], axis=0).T
    audio = spectrum_to_audio(jnp.asarray(head[None, :, None], jnp.float32), hop, n_fft)
    # The last frame's right half is missing from 40 frames: compare away from the end.
    np.testing.assert_allclose(audio[0, :-n_fft, 0], x[:-n_fft], atol=1e-4)


def test_advancing_phase_follows_a_steady_tone():
    hop, n_fft, sr = 40, 160, 16000
    k0 = 13  # a tone at a bin's centre: 1300 Hz
    t = np.arange(30 * hop) / sr
    spec = librosa.stft(np.cos(2 * np.pi * k0 * sr / n_fft * t + 0.7), n_fft=n_fft,
                        hop_length=hop, window="hann", center=True)[:, 2:22].T  # [frames, bins]
    delta = np.zeros((1, 20, 1, n_fft // 2 + 1), np.float32)
    # The first frame carries the tone's phase there, less the bin's own advance to frame 0.
    delta[0, 0, 0, k0] = np.angle(spec[0, k0])
    phase = np.asarray(advancing_phase(jnp.asarray(delta), hop, n_fft))[0, :, 0, k0]
    np.testing.assert_allclose(np.exp(1j * phase), np.exp(1j * np.angle(spec[:, k0])),
                               atol=1e-4)
    # Between bins, a constant advance keeps the tone coherent.
    offset = 0.3
    delta[0, 1:, 0, k0] = offset
    phase = np.asarray(advancing_phase(jnp.asarray(delta), hop, n_fft))[0, :, 0, k0]
    np.testing.assert_allclose(np.diff(np.unwrap(phase)),
                               2 * np.pi * k0 * hop / n_fft % (2 * np.pi) + offset, atol=1e-4)


def _codec(**overrides):
    base = dict(sample_rate=16000, encoder_dim=4, encoder_rates=(2, 4, 5), latent_dim=16,
                decoder_dim=32, decoder="istft", istft_layers=2, quantizer="kl",
                quantizer_dropout=0.0)
    base.update(overrides)
    return make_codec(base)


def test_istft_codec_shapes_names_and_gradients():
    codec = _codec()
    assert codec.config.resolved_istft_n_fft == 160
    variables = init_variables(codec, RNG)
    p = variables["params"]["decoder"]
    assert p["head"]["kernel"].shape == (32, 162)
    assert p["block_1"]["dwconv"]["kernel"].shape == (7, 1, 32)
    np.testing.assert_allclose(p["block_0"]["gamma"], np.full(32, 0.5))
    boxed = jax.eval_shape(lambda r: init_variables(codec, r, boxed=True), RNG)
    names = boxed["params"]["decoder"]["block_0"]["pwconv1"]["kernel"].names
    assert names == ("embed", "mlp")
    x = jnp.asarray(0.3 * np.random.default_rng(1).standard_normal((2, 200, 1)), jnp.float32)

    def loss(params):
        y, _ = codec.apply({"params": params}, x)
        return jnp.mean(jnp.abs(y - x)), y

    grads, y = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert y.shape == x.shape
    dead = [jax.tree_util.keystr(k) for k, g in
            jax.tree_util.tree_flatten_with_path(grads["decoder"])[0]
            if not float(jnp.max(jnp.abs(g))) > 0]
    assert not dead, dead
    # Whole frames: a 5.5-frame input decodes to 6 frames, cut back to the input.
    z = jax.eval_shape(lambda v, x: codec.apply(v, x, method=Codec.encode)[0], variables,
                       jnp.zeros((2, 220, 1)))
    assert z.shape == (2, 6, 16)
    decoded = jax.eval_shape(lambda v, z: codec.apply(v, z, method=Codec.decode), variables, z)
    assert decoded.shape == (2, 240, 1)


def test_istft_config_errors():
    with pytest.raises(ConfigError, match="causal"):
        CodecConfig(decoder="istft", causal=True)
    with pytest.raises(ConfigError, match="istft_n_fft"):
        CodecConfig(decoder="istft", encoder_rates=(2, 4), istft_n_fft=6)
    with pytest.raises(ConfigError, match="decoder"):
        CodecConfig(decoder="wavenet")
    with pytest.raises(ConfigError, match="istft_phase"):
        CodecConfig(decoder="istft", istft_phase="random")
