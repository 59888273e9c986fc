"""A decoder that predicts a short-time spectrum and inverts it (Vocos; Siuzdak 2023).

A ConvNeXt backbone runs at the latent frame rate: a width-7 convolution embeds the latents,
then blocks of a depthwise width-7 convolution, LayerNorm, a pointwise MLP (GELU) and a
layer-scaled residual. A linear head gives, per frame and channel, `n_fft // 2 + 1` log
magnitudes and phases; the magnitude is `exp`, clipped at 100, and the phase enters through its
cosine and sine (the head's output is unconstrained, so its phase may wrap freely). The complex
spectrum, one frame per latent frame (hop = the codec's hop), is inverted by `dsp.istft` with a
periodic Hann window of `n_fft` samples centred on each frame: frame t covers samples
`t * hop ± n_fft / 2`, and the output has exactly `frames * hop` samples.

Nothing upsamples sample by sample, so the model learns no phase-coherent upsampling and runs
every layer at the frame rate: at equal width it costs a fraction of the transposed-convolution
decoder's FLOPs (`ldm-jax bench codec --decoders`). Each frame's window reaches into the next
frames, so the decoder is not causal. The output is not squashed to [-1, 1]: clip or normalise
when writing.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.audio import dsp
from ldm_jax.nn import layers

# Vocos initialises every convolution and linear layer from N(0, 0.02²) truncated at 2σ.
_INIT = nn.initializers.truncated_normal(0.02)


class ConvNeXtBlock(nn.Module):
    """`x + γ · MLP(LayerNorm(depthwise_conv(x)))`, channels last `[B, frames, dim]`."""

    dim: int
    mlp_ratio: float = 3.0
    layer_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.conv(self.dim, (7,), padding="SAME", feature_group_count=self.dim,
                        names=(None, "embed"), kernel_init=_INIT, name="dwconv", **kw)(x)
        h = layers.layer_norm("embed", name="norm", epsilon=1e-6, **kw)(h)
        h = layers.dense(int(self.mlp_ratio * self.dim), ("embed", "mlp"), kernel_init=_INIT,
                         name="pwconv1", **kw)(h)
        h = nn.gelu(h, approximate=False)
        h = layers.dense(self.dim, ("mlp", "embed"), kernel_init=_INIT, name="pwconv2", **kw)(h)
        gamma = self.param("gamma", layers.named(nn.initializers.constant(self.layer_scale),
                                                 ("embed",)), (self.dim,), self.param_dtype)
        return x + gamma.astype(h.dtype) * h


def spectrum_to_audio(head: jax.Array, hop_length: int, n_fft: int) -> jax.Array:
    """Inverts the head's output.

    Args:
      head: `[B, frames, channels, n_fft + 2]`: log magnitudes then phases of the
        `n_fft // 2 + 1` bins of each frame.
      hop_length: samples per frame.
      n_fft: the STFT size (also the Hann window's length).

    Returns:
      float32 audio `[B, frames * hop_length, channels]`.
    """
    head = head.astype(jnp.float32)
    log_mag, phase = jnp.split(head, 2, axis=-1)
    mag = jnp.minimum(jnp.exp(log_mag), 1e2)
    spec = jax.lax.complex(mag * jnp.cos(phase), mag * jnp.sin(phase))
    frames = head.shape[1]
    audio = dsp.istft(jnp.moveaxis(spec, 2, 1), hop_length, n_fft=n_fft, window="hann",
                      center=True, length=frames * hop_length)
    return jnp.moveaxis(audio, 1, 2)


class ISTFTDecoder(nn.Module):
    """Latents `[B, frames, latent_dim]` -> audio `[B, frames * hop, channels]`."""

    dim: int
    hop_length: int
    n_fft: int
    num_layers: int = 8
    mlp_ratio: float = 3.0
    channels: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.conv(self.dim, (7,), padding="SAME", names=("conv_in", "embed"),
                        kernel_init=_INIT, name="conv_in", **kw)(z)
        x = layers.layer_norm("embed", name="norm_in", epsilon=1e-6, **kw)(x)
        for i in range(self.num_layers):
            x = ConvNeXtBlock(self.dim, self.mlp_ratio, 1.0 / self.num_layers,
                              name=f"block_{i}", **kw)(x)
        x = layers.layer_norm("embed", name="norm_out", epsilon=1e-6, **kw)(x)
        bins = self.n_fft // 2 + 1
        head = layers.dense(self.channels * 2 * bins, ("embed", "conv_out"), kernel_init=_INIT,
                            name="head", **kw)(x)
        head = head.reshape(head.shape[:2] + (self.channels, 2 * bins))
        return spectrum_to_audio(head, self.hop_length, self.n_fft)
