"""Finite scalar quantisation: the grid, exact code round trips, the straight-through gradient,
code usage, and the FSQ codec's config."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.codec import Codec, CodecConfig, CodecError, init_variables, make_codec, quantize
from ldm_jax.config import ConfigError

LEVELS = jnp.asarray((8, 5, 3, 4), jnp.int32)


def test_bound_and_round_give_exactly_the_levels():
    z = jnp.linspace(-12.0, 12.0, 20001)[:, None] * jnp.ones((1, 4))
    values, digits = jax.jit(quantize.fsq_quantize)(z, LEVELS)
    for i, n in enumerate(LEVELS.tolist()):
        assert sorted(set(np.asarray(digits[:, i]).tolist())) == list(range(n))
        half = n // 2
        np.testing.assert_allclose(np.unique(values[:, i]), (np.arange(n) - half) / half,
                                   atol=1e-6)
    # The shift makes zero a fixed point of the bound, for even L as for odd.
    np.testing.assert_allclose(quantize.fsq_bound(jnp.zeros(4), LEVELS), np.zeros(4), atol=1e-6)


def test_codes_round_trip_exactly():
    size = math.prod(LEVELS.tolist())
    codes = jnp.arange(size, dtype=jnp.int32)
    values = quantize.fsq_unpack(codes, LEVELS)
    assert values.shape == (size, 4) and float(jnp.max(jnp.abs(values))) <= 1.0
    digits = jnp.round(values * (LEVELS // 2) + LEVELS // 2).astype(jnp.int32)
    np.testing.assert_array_equal(quantize.fsq_pack(digits, LEVELS), codes)
    # Quantising the grid values' preimages gives the same codes back.
    half = (LEVELS - 1) * (1 + 1e-3) / 2
    offset = jnp.where(LEVELS % 2 == 0, 0.5, 0.0)
    z = jnp.arctanh((values * (LEVELS // 2) + offset) / half) - jnp.arctanh(offset / half)
    again, digits_again = quantize.fsq_quantize(z, LEVELS)
    np.testing.assert_array_equal(quantize.fsq_pack(digits_again, LEVELS), codes)
    np.testing.assert_allclose(again, values, atol=1e-6)


def test_straight_through_gradient_is_the_bounds():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4)), jnp.float32)
    grad = jax.grad(lambda z: jnp.sum(w * quantize.fsq_quantize(z, LEVELS)[0]))(z)
    expected = jax.grad(lambda z: jnp.sum(w * quantize.fsq_bound(z, LEVELS)
                                          / (LEVELS // 2)))(z)
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
    assert float(jnp.min(jnp.abs(grad))) > 0.0  # rounding alone would give zero everywhere


def test_code_usage_statistics():
    codes = jnp.arange(480, dtype=jnp.int32).reshape(1, 480, 1)
    stats = quantize.codebook_usage(codes, 480)
    np.testing.assert_allclose(stats["vq/usage"], 1.0)
    np.testing.assert_allclose(stats["vq/perplexity"], 480.0, rtol=1e-4)
    half = quantize.codebook_usage(codes // 2 * 2, 480)
    np.testing.assert_allclose(half["vq/usage"], 0.5)


def _codec(**overrides):
    base = dict(sample_rate=16000, encoder_dim=4, encoder_rates=(2, 3), latent_dim=16,
                decoder_dim=16, decoder_rates=(3, 2), n_codebooks=2, quantizer="fsq",
                fsq_levels=(5, 4, 3), transpose_output_padding=True)
    base.update(overrides)
    return make_codec(base)


def test_fsq_codec_codes_round_trip():
    codec = _codec()
    assert codec.config.codebook_size == 60
    assert codec.bitrate() == pytest.approx(2 * math.log2(60) * 16000 / 6)
    variables = init_variables(codec, jax.random.key(0, impl="rbg"))

    @jax.jit
    def run(x):
        z, aux = codec.apply(variables, x, method=Codec.encode)
        return z, aux, codec.apply(variables, aux["codes"], method=Codec.from_codes)

    x = jnp.asarray(0.3 * np.random.default_rng(2).standard_normal((2, 60, 1)), jnp.float32)
    z, aux, z_codes = run(x)
    assert aux["codes"].shape == (2, 10, 2) and aux["codes"].dtype == jnp.int32
    assert int(aux["codes"].min()) >= 0 and int(aux["codes"].max()) < 60
    assert aux["losses"] == {} and 0.0 < float(aux["stats"]["vq/usage"]) <= 1.0
    np.testing.assert_allclose(z_codes, z, atol=1e-5)
    with pytest.raises(CodecError, match="groups"):
        codec.apply(variables, aux["codes"][..., :1], method=Codec.from_codes)
    with pytest.raises(CodecError, match="groups"):
        codec.apply(variables, x, n_quantizers=1, method=Codec.encode)


def test_fsq_config_errors():
    with pytest.raises(ConfigError, match="quantizer_dropout"):
        CodecConfig(quantizer="fsq", quantizer_dropout=0.5)
    with pytest.raises(ConfigError, match="at least 2"):
        CodecConfig(quantizer="fsq", fsq_levels=(8, 1))
    with pytest.raises(ConfigError, match="more groups"):
        CodecConfig(quantizer="fsq", fsq_levels=(8, 8, 8, 8, 8, 8))
    cfg = CodecConfig(quantizer="fsq", fsq_levels=[7, 5, 5, 5, 5])
    assert cfg.fsq_levels == (7, 5, 5, 5, 5) and cfg.codebook_size == 4375
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg
