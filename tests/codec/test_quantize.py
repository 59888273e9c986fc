"""Bottlenecks: RVQ round trips, quantizer dropout, EMA updates, dead-code restarts, KL loss."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.codec import quantize
from ldm_jax.codec.quantize import STATS, EMAResidualVQ, KLBottleneck, ResidualVQ

B, T, D, K, N, DIM = 6, 5, 12, 4, 16, 4


def key(seed):
    """An rbg key: threefry sampling compiles slowly on CPU."""
    return jax.random.key(seed, impl="rbg")


def _inputs(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), jnp.float32)


@pytest.fixture(scope="module")
def dac_rvq():
    module = ResidualVQ(D, K, N, DIM, dropout_rate=0.5)
    variables = jax.jit(module.init)(key(1), _inputs())
    apply = jax.jit(functools.partial(module.apply, variables),
                    static_argnames=("n_quantizers", "train"))
    from_codes = jax.jit(functools.partial(module.apply, variables, method=module.from_codes))
    return module, variables, apply, from_codes


@pytest.fixture(scope="module")
def dac_stage_outputs(dac_rvq):
    """Each stage's decoded contribution `out_proj(codebook[codes_i])`, `[K, B, T, D]`."""
    module, variables, _, _ = dac_rvq

    def stages(m, codes):
        return jnp.stack([m.vq[i].out_proj(m.vq[i].embed_codes(codes[..., i]))
                          for i in range(codes.shape[-1])])

    return jax.jit(functools.partial(module.apply, variables, method=stages))


@pytest.fixture(scope="module")
def ema_rvq():
    module = EMAResidualVQ(D, K, N, DIM, dropout_rate=0.0, decay=0.9, dead_code_threshold=0.5)
    variables = nn.meta.unbox(jax.jit(module.init)(key(2), _inputs()))

    @functools.partial(jax.jit, static_argnames=("train",))
    def apply(variables, x, rng, train):
        return module.apply(variables, x, train=train, rngs={"quantizer": rng}, mutable=[STATS])

    from_codes = jax.jit(lambda v, c: module.apply(v, c, method=module.from_codes))
    return module, variables, apply, from_codes


def test_dac_rvq_codes_round_trip(dac_rvq):
    _, _, apply, from_codes = dac_rvq
    z, aux = apply(_inputs(3))
    assert aux["codes"].shape == (B, T, K) and aux["codes"].dtype == jnp.int32
    assert aux["latents"].shape == (B, T, K * DIM)
    np.testing.assert_array_equal(aux["n_active"], np.full(B, K))
    z_codes, raw = from_codes(aux["codes"])
    np.testing.assert_allclose(z_codes, z, atol=1e-5)
    assert raw.shape == (B, T, K * DIM)


def test_dac_rvq_codes_are_nearest_cosine(dac_rvq):
    _, variables, apply, _ = dac_rvq
    _, aux = apply(_inputs(4))
    codebook = np.asarray(variables["params"]["vq_0"]["codebook"].unbox())
    lat = np.asarray(aux["latents"][..., :DIM])
    cos = (lat / np.linalg.norm(lat, axis=-1, keepdims=True)) @ (
        codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)).T
    np.testing.assert_array_equal(aux["codes"][..., 0], cos.argmax(-1))


def test_fewer_quantizers_prefix(dac_rvq):
    _, _, apply, from_codes = dac_rvq
    x = _inputs(5)
    _, aux = apply(x)
    z2, aux2 = apply(x, n_quantizers=2)
    np.testing.assert_array_equal(aux2["codes"], aux["codes"][..., :2])
    np.testing.assert_allclose(from_codes(aux2["codes"])[0], z2, atol=1e-5)


def test_quantizer_dropout_varies_per_example_in_training(dac_rvq, dac_stage_outputs):
    _, _, apply, _ = dac_rvq
    x = jnp.tile(_inputs(6), (4, 1, 1))  # 24 examples
    z, aux = apply(x, train=True, rngs={"quantizer": key(7)})
    active = np.asarray(aux["n_active"])
    assert active.min() >= 1 and active.max() == K
    assert len(set(active.tolist())) >= 3, active
    # Each example's z is the sum of exactly its first n_active stages.
    stages = np.asarray(dac_stage_outputs(aux["codes"]))
    for b in range(x.shape[0]):
        np.testing.assert_allclose(z[b], stages[:active[b], b].sum(0), atol=1e-5)
    _, aux_eval = apply(x, train=False)
    np.testing.assert_array_equal(aux_eval["n_active"], np.full(x.shape[0], K))


def test_dropout_counts_distribution():
    counts = quantize.quantizer_dropout_counts(key(0), 2000, 8, 0.5)
    counts = np.asarray(counts)
    assert counts.min() == 1 and counts.max() == 8
    # Half keep all 8; the other half is uniform on 1..8, so P(8) = 0.5 + 0.5 / 8.
    assert abs(np.mean(counts == 8) - 0.5625) < 0.04
    np.testing.assert_array_equal(quantize.quantizer_dropout_counts(key(1), 5, 3,
                                                                    0.0), np.full(5, 3))


def test_vq_losses_and_straight_through():
    x = jnp.array([[[1.0, 2.0]], [[0.0, 0.0]]])
    q = jnp.array([[[0.0, 0.0]], [[1.0, 1.0]]])
    commitment, codebook = quantize.vq_losses(x, q)
    np.testing.assert_allclose(commitment, [2.5, 1.0])
    np.testing.assert_allclose(codebook, [2.5, 1.0])
    grad = jax.grad(lambda x: jnp.sum(3.0 * quantize.straight_through(x, q)))(x)
    np.testing.assert_allclose(grad, 3.0 * np.ones_like(x))
    # Commitment pulls only the encoder side, codebook loss only the codes.
    gx = jax.grad(lambda x: jnp.sum(quantize.vq_losses(x, q)[1]))(x)
    np.testing.assert_allclose(gx, 0.0)


def test_ema_update_moves_code_toward_assigned_mean():
    embed = np.zeros((3, 2), np.float32)
    cluster = np.ones(3, np.float32)
    samples = np.array([[1.0, 1.0], [3.0, 1.0], [-2.0, 0.0]], np.float32)
    codes = np.array([0, 0, 2])
    weights = np.array([1.0, 1.0, 0.0])  # the third vector belongs to a dropped-out example
    decay, eps = 0.5, 1e-5
    new_embed, new_avg, new_cluster = quantize.ema_update(
        jnp.asarray(embed * cluster[:, None]), jnp.asarray(cluster), jnp.asarray(samples),
        jnp.asarray(codes), jnp.asarray(weights), decay=decay, epsilon=eps)
    want_cluster = decay * cluster + (1 - decay) * np.array([2.0, 0.0, 0.0])
    want_avg = np.array([[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    total = want_cluster.sum()
    smooth = (want_cluster + eps) / (total + 3 * eps) * total
    np.testing.assert_allclose(new_cluster, want_cluster, rtol=1e-6)
    np.testing.assert_allclose(new_avg, want_avg, rtol=1e-6)
    np.testing.assert_allclose(new_embed, want_avg / smooth[:, None], rtol=1e-5)
    target = samples[:2].mean(0)
    assert np.linalg.norm(new_embed[0] - target) < np.linalg.norm(embed[0] - target)
    np.testing.assert_allclose(new_embed[1:], 0.0)


def test_restart_replaces_only_dead_codes():
    embed = jnp.arange(8.0).reshape(4, 2)
    samples = jnp.array([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])
    cluster = jnp.array([5.0, 0.0, 3.0, 1.0])
    new_embed, new_avg, new_cluster, dead = quantize.restart_dead_codes(
        key(0), embed, embed * cluster[:, None], cluster, samples, threshold=2.0)
    np.testing.assert_array_equal(dead, [False, True, False, True])
    for i in (1, 3):
        assert any(np.allclose(new_embed[i], s) for s in np.asarray(samples))
        np.testing.assert_allclose(new_avg[i], new_embed[i] * 2.0)
    np.testing.assert_allclose(new_embed[jnp.array([0, 2])], embed[jnp.array([0, 2])])
    np.testing.assert_allclose(new_cluster, [5.0, 2.0, 3.0, 2.0])


def test_ema_rvq_round_trip_and_training_updates(ema_rvq):
    _, variables, apply, from_codes = ema_rvq
    x = _inputs(8)
    (z, aux), state = apply(variables, x, key(0), False)
    np.testing.assert_allclose(from_codes(variables, aux["codes"])[0], z, atol=1e-5)
    for leaf_a, leaf_b in zip(jax.tree.leaves(state[STATS]), jax.tree.leaves(variables[STATS])):
        np.testing.assert_array_equal(leaf_a, leaf_b)  # eval leaves the statistics alone
    assert float(aux["losses"]["vq/codebook_loss"]) == 0.0

    (_, aux_t), state_t = apply(variables, x, key(0), True)
    stats0 = variables[STATS]["vq_0"]
    new0 = state_t[STATS]["vq_0"]
    latents = np.asarray(aux_t["latents"][..., :DIM]).reshape(-1, DIM)
    codes = np.asarray(aux_t["codes"][..., 0]).reshape(-1)
    used = np.unique(codes)
    counts = np.bincount(codes, minlength=N)
    np.testing.assert_allclose(new0["cluster_size"][used],
                               0.9 * np.asarray(stats0["cluster_size"])[used]
                               + 0.1 * counts[used], rtol=1e-5)
    for code in used:  # every used code moved toward the mean of its vectors
        target = latents[codes == code].mean(0)
        before = np.linalg.norm(np.asarray(stats0["embed"])[code] - target)
        after = np.linalg.norm(np.asarray(new0["embed"])[code] - target)
        assert after < before


def test_ema_rvq_restarts_never_used_code(ema_rvq):
    module, variables, apply, _ = ema_rvq
    x = _inputs(9)
    stats = jax.tree.map(lambda a: a, variables[STATS])
    embed = np.asarray(stats["vq_0"]["embed"]).copy()
    embed[5] = 1e4  # far from every latent: never assigned
    stats["vq_0"]["embed"] = jnp.asarray(embed)
    stats["vq_0"]["cluster_size"] = jnp.full((N,), 0.55)  # just above the 0.5 threshold
    v = {**variables, STATS: stats}
    (_, aux), state = apply(v, x, key(3), True)
    assert 5 not in np.asarray(aux["codes"][..., 0])
    new = np.asarray(state[STATS]["vq_0"]["embed"])
    latents = np.asarray(aux["latents"][..., :DIM]).reshape(-1, DIM)
    assert np.min(np.abs(latents - new[5]).max(-1)) < 1e-5  # now sits on a batch vector
    assert float(state[STATS]["vq_0"]["cluster_size"][5]) == pytest.approx(0.5)


def test_ema_training_needs_mutable_stats(ema_rvq):
    module, variables, _, _ = ema_rvq
    with pytest.raises(quantize.CodecError, match="mutable"):
        jax.eval_shape(lambda v, x: module.apply(v, x, train=True, rngs={"quantizer": key(0)}),
                       variables, _inputs())


def test_kl_loss_matches_hand_computation():
    mean = np.array([[[0.5, -1.0]]], np.float32)
    std = np.array([[[2.0, 0.5]]], np.float32)
    want = 0.5 * sum(m * m + s * s - np.log(s * s) - 1 for m, s in zip(mean.ravel(), std.ravel()))
    np.testing.assert_allclose(quantize.kl_divergence(mean, std), want, rtol=1e-6)
    np.testing.assert_allclose(quantize.kl_divergence(np.zeros((2, 3, 4)), np.ones((2, 3, 4))),
                               0.0, atol=1e-7)


def test_kl_bottleneck_samples_in_training_only():
    module = KLBottleneck(D)
    x = _inputs(10)

    @jax.jit
    def run(x):
        variables = module.init(key(0), x)
        z, aux = module.apply(variables, x)
        h = module.apply(variables, x, method=lambda m, x: m.proj(x))
        z_t, _ = module.apply(variables, x, train=True, rngs={"noise": key(1)})
        return z, aux, h, z_t

    z, aux, h, z_t = run(x)
    np.testing.assert_array_equal(z, aux["mean"])
    np.testing.assert_allclose(aux["mean"], h[..., :D], rtol=1e-6)
    np.testing.assert_allclose(aux["std"], np.log1p(np.exp(np.asarray(h[..., D:]))) + 1e-4,
                               rtol=1e-5)
    np.testing.assert_allclose(aux["losses"]["kl/loss"],
                               quantize.kl_divergence(aux["mean"], aux["std"]), rtol=1e-6)
    assert not np.allclose(z_t, z)
    np.testing.assert_allclose(np.std(np.asarray(z_t - z) / np.asarray(aux["std"])), 1.0,
                               atol=0.2)
    with pytest.raises(quantize.CodecError, match="noise"):
        jax.eval_shape(lambda x: module.apply(module.init(key(0), x), x, train=True), x)


def test_usage_and_bitrate():
    codes = jnp.array([[[0, 1], [1, 1], [2, 1], [3, 1]]])
    stats = quantize.codebook_usage(codes, 8)
    np.testing.assert_allclose(stats["vq/perplexity"], (4.0 + 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(stats["vq/usage"], (4 / 8 + 1 / 8) / 2, rtol=1e-6)
    assert quantize.bitrate(9, 1024, 44100 / 512) == pytest.approx(7751.953125)
