"""Codec model: parameter counts of the DAC presets, shapes, hop length, causality, layers."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ldm_jax.codec import PRESETS, Codec, CodecConfig, CodecError, init_variables, make_codec
from ldm_jax.config import ConfigError
from ldm_jax.nn import Snake, WNConv1d, WNConvTranspose1d, snake

# Compiling threefry sampling is slow on CPU; the rbg generator keeps initialisers quick.
RNG = jax.random.key(0, impl="rbg")


def make_test_model(**overrides) -> Codec:
    """A codec small enough to compile in a few seconds on CPU."""
    base = dict(sample_rate=16000, encoder_dim=4, encoder_rates=(2, 3), latent_dim=16,
                decoder_dim=16, decoder_rates=(3, 2), n_codebooks=3, codebook_size=16,
                codebook_dim=4, quantizer_dropout=0.0)
    base.update(overrides)
    return make_codec(base)


def fast_variables(codec: Codec, seed: int = 0):
    """Random variables of the codec's shapes, drawn with numpy.

    Compiling an initialiser for a whole codec takes tens of seconds on a loaded CPU; the shapes
    come from `jax.eval_shape` of the real initialiser, so they stay in step with it.
    """
    shapes = nn.unbox(jax.eval_shape(lambda r: init_variables(codec, r), RNG))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "weight_g":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif path[-1] == "alpha":
            value = rng.uniform(0.5, 2.0, leaf.shape)
        elif path[-1] == "bias":
            value = 0.01 * rng.standard_normal(leaf.shape)
        else:
            value = rng.standard_normal(leaf.shape)
        flat[path] = jnp.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset,key", [("dac_44khz", "44khz"), ("dac_24khz", "24khz"),
                                        ("dac_16khz", "16khz"),
                                        ("dac_44khz_16kbps", "44khz_16kbps")])
def test_official_parameter_counts(preset, key, fixtures_dir):
    with open(os.path.join(fixtures_dir, "dac", "44khz_manifest.json")) as f:
        manifest = json.load(f)["configs"][key]
    codec = make_codec(preset)
    shapes = jax.eval_shape(lambda r: init_variables(codec, r), RNG)
    assert _count(shapes["params"]) == manifest["num_parameters"]
    assert codec.hop_length == manifest["hop_length"]
    assert codec.config.resolved_latent_dim == manifest["latent_dim"]


def test_tiny_parameter_count(fixtures_dir):
    with open(os.path.join(fixtures_dir, "dac", "tiny_manifest.json")) as f:
        manifest = json.load(f)
    codec = make_codec("dac_16khz_tiny")
    shapes = jax.eval_shape(lambda r: init_variables(codec, r), RNG)
    assert _count(shapes["params"]) == manifest["num_parameters"] == 437_902
    assert codec.hop_length == manifest["hop_length"]


def test_bitrate_and_frame_rate():
    assert make_codec("dac_44khz").bitrate() == pytest.approx(9 * 10 * 44100 / 512)
    assert make_codec("dac_16khz").bitrate(12) == pytest.approx(6000.0)
    tiny = make_codec("dac_16khz_tiny")
    assert tiny.frame_rate == 400.0 and tiny.bitrate(2) == pytest.approx(2 * 6 * 400)
    with pytest.raises(CodecError):
        make_test_model(quantizer="kl").bitrate()


def test_config_errors():
    with pytest.raises(ConfigError, match="bogus"):
        make_codec({"bogus": 1})
    with pytest.raises(ConfigError, match="quantizer"):
        CodecConfig(quantizer="vqvae")
    with pytest.raises(ConfigError, match="preset"):
        make_codec("dac_8khz")
    assert CodecConfig.from_dict(PRESETS["dac_16khz_tiny"].to_dict()) == PRESETS["dac_16khz_tiny"]


def test_shapes_and_hop_length():
    codec = make_test_model(transpose_output_padding=True)
    assert codec.hop_length == 6
    variables = fast_variables(codec)

    @jax.jit
    def run(x):
        z, aux = codec.apply(variables, x, method=Codec.encode)
        y = codec.apply(variables, z, method=Codec.decode)
        y_codes = codec.apply(variables, aux["codes"], method=Codec.decode_codes)
        return z, aux, y, y_codes

    x = jnp.asarray(0.1 * np.random.default_rng(1).standard_normal((2, 60, 1)), jnp.float32)
    z, aux, y, y_codes = run(x)
    assert z.shape == (2, 10, 16) and aux["z_e"].shape == (2, 10, 16)
    assert aux["codes"].shape == (2, 10, 3) and aux["latents"].shape == (2, 10, 12)
    assert y.shape == (2, 60, 1) and float(jnp.max(jnp.abs(y))) <= 1.0
    # Same codes, same audio: only the straight-through rounding (~1e-7) separates the two.
    np.testing.assert_allclose(y_codes, y, atol=1e-3)
    # A length that is not a multiple of the hop is padded to whole frames.
    z_odd = jax.eval_shape(lambda x: codec.apply(variables, x, method=Codec.encode)[0],
                           x[:, :55])
    assert z_odd.shape == (2, 10, 16)


def test_odd_stride_without_output_padding_drops_a_sample():
    codec = make_test_model()
    x = jnp.zeros((1, 60, 1))
    variables = jax.eval_shape(lambda r: init_variables(codec, r), RNG)
    z = jax.ShapeDtypeStruct((1, 10, 16), jnp.float32)
    y = jax.eval_shape(lambda v, z: codec.apply(v, z, method=Codec.decode), variables, z)
    assert y.shape == (1, (3 * 10 - 1) * 2, 1)  # stride 3 gives 3L - 1, stride 2 gives 2L
    audio = jax.eval_shape(lambda v, x: codec.apply(v, x)[0], variables, x)
    assert audio.shape == (1, 58, 1)
    with pytest.raises(CodecError, match="samples"):
        codec.apply(variables, jnp.zeros((1, 60)))


def test_causal_codec_ignores_the_future():
    codec = make_test_model(causal=True)
    variables = fast_variables(codec)

    @jax.jit
    def run(x):  # x [2, T, 1]: the second example is the first with its future changed
        z_e = codec.apply(variables, x, method=Codec.encode)[1]["z_e"]
        z = jnp.concatenate([z_e[:1], z_e[:1].at[:, 4:].add(1.0)])  # frames 4 on (samples 24 on)
        return z_e, codec.apply(variables, z, method=Codec.decode)

    x = jnp.asarray(0.1 * np.random.default_rng(1).standard_normal((1, 60, 1)), jnp.float32)
    x2 = x.at[:, 30:].set(0.7)  # change samples from 30 on (frame 5 on, hop 6)
    z_e, y = run(jnp.concatenate([x, x2]))
    e1, e2 = z_e[:1], z_e[1:]
    np.testing.assert_allclose(e1[:, :5], e2[:, :5], atol=1e-6)
    assert not np.allclose(e1[:, 5:], e2[:, 5:])
    y1, y2 = y[:1], y[1:]
    assert y1.shape == (1, 60, 1)
    np.testing.assert_allclose(y1[:, :24], y2[:, :24], atol=1e-6)
    assert not np.allclose(y1[:, 24:], y2[:, 24:])


def _torch_conv_transpose(x, w, stride, padding, output_padding):
    """Reference ConvTranspose1d from its definition: x [T, I], w [I, O, K] -> [T', O]."""
    t, _ = x.shape
    _, o, k = w.shape
    full = np.zeros(((t - 1) * stride + k + output_padding, o))
    for n in range(t):
        for j in range(k):
            full[n * stride + j] += x[n] @ w[:, :, j]
    return full[padding:full.shape[0] - padding]


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_conv_transpose_matches_definition(stride):
    k, p = 2 * stride, -(-stride // 2)
    x = np.random.default_rng(stride).standard_normal((1, 7, 3)).astype(np.float32)
    for op in (0, stride % 2):
        layer = WNConvTranspose1d(4, k, stride=stride, padding=p, output_padding=op,
                                  use_bias=False)
        variables = layer.init(RNG, x)
        y = layer.apply(variables, x)
        v = np.asarray(variables["params"]["weight_v"].unbox())  # [k, in, out], g = ||v|| at init
        want = _torch_conv_transpose(x[0], v.transpose(1, 2, 0), stride, p, op)
        assert y.shape[1] == 7 * stride - (stride % 2) + op
        np.testing.assert_allclose(y[0], want, atol=1e-5)


def test_causal_convs_are_causal():
    x = np.random.default_rng(0).standard_normal((2, 20, 2)).astype(np.float32)
    x[1] = x[0]
    x[1, 12:] += 1.0  # the second example differs from sample 12 on

    def run(layer):
        out = layer.apply(layer.init(RNG, x), x)
        return out[:1], out[1:]

    y1, y2 = run(WNConv1d(3, 7, dilation=2, causal=True))
    assert y1.shape == (1, 20, 3)
    np.testing.assert_allclose(y1[:, :12], y2[:, :12], atol=1e-6)
    assert not np.allclose(y1[:, 12:], y2[:, 12:])
    d1, d2 = run(WNConv1d(3, 8, stride=4, causal=True))
    assert d1.shape == (1, 5, 3)  # frame t sees samples up to 4t + 3
    np.testing.assert_allclose(d1[:, :3], d2[:, :3], atol=1e-6)
    u1, u2 = run(WNConvTranspose1d(3, 6, stride=3, causal=True))
    assert u1.shape == (1, 60, 3)
    np.testing.assert_allclose(u1[:, :36], u2[:, :36], atol=1e-6)
    assert not np.allclose(u1[:, 36:], u2[:, 36:])


def test_weight_norm_scale_and_direction():
    x = np.random.default_rng(1).standard_normal((2, 9, 3)).astype(np.float32)
    conv = WNConv1d(5, 3, padding=1)
    variables = nn.unbox(conv.init(RNG, x))
    p = variables["params"]
    y = conv.apply(variables, x)
    # The direction's scale does not matter; g scales each output channel.
    scaled = {**p, "weight_v": 7.0 * p["weight_v"]}
    np.testing.assert_allclose(conv.apply({"params": scaled}, x), y, atol=1e-5)
    doubled = {**p, "weight_g": p["weight_g"].at[2].multiply(2.0)}
    y2 = conv.apply({"params": doubled}, x)
    np.testing.assert_allclose(y2[..., 2], 2.0 * y[..., 2], atol=1e-5)
    np.testing.assert_allclose(np.delete(y2, 2, -1), np.delete(y, 2, -1), atol=1e-6)
    assert p["weight_g"].shape == (5,) and p["weight_v"].shape == (3, 3, 5)


def test_snake_formula():
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(1, 4, 3)
    alpha = np.array([0.5, 1.0, 2.0], np.float32)
    want = x + np.sin(alpha * x) ** 2 / (alpha + 1e-9)
    np.testing.assert_allclose(snake(jnp.asarray(x), jnp.asarray(alpha)), want, rtol=1e-6)
    variables = Snake().init(RNG, x)
    np.testing.assert_allclose(nn.unbox(variables)["params"]["alpha"], np.ones(3))


def test_kl_codec_shapes():
    codec = make_test_model(quantizer="kl")
    variables = jax.eval_shape(lambda r: init_variables(codec, r), RNG)
    x = jax.ShapeDtypeStruct((2, 24, 1), jnp.float32)
    z, aux = jax.eval_shape(lambda v, x: codec.apply(v, x, method=Codec.encode), variables, x)
    assert z.shape == (2, 4, 16) and "codes" not in aux and aux["losses"]["kl/loss"].shape == ()
    assert aux["mean"].shape == aux["std"].shape == z.shape
    with pytest.raises(CodecError, match="kl"):
        jax.eval_shape(lambda v: codec.apply(v, jnp.zeros((2, 4, 3), jnp.int32),
                                             method=Codec.decode_codes), variables)


def test_parameter_names_follow_dac_layout():
    codec = make_test_model()
    shapes = nn.unbox(jax.eval_shape(lambda r: init_variables(codec, r), RNG))
    p = shapes["params"]
    assert p["decoder"]["block_0"]["conv_t"]["weight_g"].shape == (16,)  # per input channel
    assert p["decoder"]["block_0"]["conv_t"]["weight_v"].shape == (6, 16, 8)
    assert p["quantizer"]["vq_2"]["codebook"].shape == (16, 4)
    assert p["encoder"]["block_1"]["res_2"]["snake_0"]["alpha"].shape == (8,)
    assert dataclasses.asdict(codec.config)["latent_dim"] == 16
