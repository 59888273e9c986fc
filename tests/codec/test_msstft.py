"""EnCodec's MS-STFT discriminator: its spectrogram, layer shapes and parameters, named axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax import parallel
from ldm_jax.codec.discriminators import Discriminator, MSSTFTDiscriminator, normalized_stft

RNG = jax.random.key(0, impl="rbg")


def test_normalized_stft_is_torchaudios():
    """Frames without centring, periodic Hann, divided by sqrt(sum(window^2)) (`normalized`)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 300)).astype(np.float32)
    n_fft, hop = 64, 16
    spec = np.asarray(normalized_stft(jnp.asarray(x), n_fft, hop))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([x[:, t * hop:t * hop + n_fft] for t in range(1 + (300 - n_fft) // hop)],
                      axis=1)
    want = np.fft.rfft(frames * window, axis=-1) / np.sqrt(np.sum(window ** 2))
    assert spec.shape == want.shape == (2, 15, 33)
    np.testing.assert_allclose(spec, want, atol=1e-5)


def test_msstft_shapes_and_parameters():
    disc = Discriminator(periods=(), fft_sizes=(), msstft_sizes=(256, 128, 64), channels=4)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 1024, 1)), jnp.float32)
    boxed = jax.eval_shape(disc.init, RNG, x)
    variables = nn.unbox(boxed)
    out = jax.eval_shape(disc.apply, variables, x)
    assert len(out) == 3
    for n_fft, fmaps in zip((256, 128, 64), out):
        frames, bins = 1 + (1024 - n_fft) // (n_fft // 4), n_fft // 2 + 1
        # Five convs (the first, three strided in frequency, one 3x3), then the logits.
        widths = [bins, -(-bins // 2), -(-bins // 4), -(-bins // 8), -(-bins // 8),
                  -(-bins // 8)]
        assert [f.shape for f in fmaps] == [(2, frames, w, 4) for w in widths[:-1]] + [
            (2, frames, widths[-1], 1)]
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    assert "msstft_256/conv_0/weight_g" not in flat  # EnCodec's first conv has no norm
    assert flat["msstft_256/conv_2/weight_v"].shape == (3, 9, 4, 4)
    assert flat["msstft_256/conv_1/weight_g"].shape == (4,)
    assert flat["msstft_256/conv_0/weight_v"].shape == (3, 9, 2, 4)  # real and imaginary
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    assert {n for leaf in leaves for n in leaf.names if n} <= set(parallel.LOGICAL_RULES)


def test_dilations_set_the_receptive_field_over_frames():
    """Frames dilated by 1, 2 and 4: a sample change reaches 1 + (1 + 2 + 4) + 1 + 1 = 10
    logit frames beyond the STFT frames that hold it, on each side (6 without dilation)."""
    n_fft, hop = 64, 16
    disc = MSSTFTDiscriminator(n_fft, channels=2)
    x = jnp.zeros((1, n_fft + hop * 40, 1), jnp.float32)
    variables = disc.init(RNG, x)
    apply = jax.jit(lambda v, x: disc.apply(v, x)[-1][0, :, :, 0])
    p = 16 * 20 + 5
    changed = np.nonzero(np.any(np.abs(np.asarray(
        apply(variables, x.at[0, p, 0].set(1.0)) - apply(variables, x))) > 0, axis=1))[0]
    first, last = -(-(p - n_fft + 1) // hop), p // hop
    assert (changed.min(), changed.max()) == (first - 10, last + 10)
