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


def advancing_phase(delta: jax.Array, hop_length: int, n_fft: int) -> jax.Array:
    """Phases from per-frame phase advances: `φ[t, k] = 2π k t hop / n_fft + Σ_{s≤t} δ[s, k]`.

    A sinusoid at the centre frequency of bin k advances its phase by `2π k hop / n_fft` per
    frame; one between bins by that plus a constant. So a steady tone is coherent from frame
    to frame with `δ` constant in time (0 at the first frame's own phase), a local quantity the
    network predicts from one frame's neighbourhood, where an absolute phase depends on the whole
    past. The bin term is computed exactly modulo 2π in integers.

    Args:
      delta: `[B, frames, ..., bins]`.

    Returns:
      The phases, shaped like `delta`.
    """
    frames, bins = delta.shape[1], delta.shape[-1]
    t = jnp.arange(frames, dtype=jnp.int32)[:, None]
    k = jnp.arange(bins, dtype=jnp.int32)[None, :]
    base = ((t * hop_length % n_fft) * k % n_fft).astype(jnp.float32) * (2 * jnp.pi / n_fft)
    base = base.reshape((1, frames) + (1,) * (delta.ndim - 3) + (bins,))
    return base + jnp.cumsum(delta, axis=1)


def spectrum_to_audio(head: jax.Array, hop_length: int, n_fft: int, *,
                      phase: str = "absolute") -> jax.Array:
    """Inverts the head's output.

    Args:
      head: `[B, frames, channels, n_fft + 2]`: log magnitudes then phases of the
        `n_fft // 2 + 1` bins of each frame.
      hop_length: samples per frame.
      n_fft: the STFT size (also the Hann window's length).
      phase: "absolute" (Vocos: the head gives each frame's phase) or "advance" (the head gives
        each frame's phase advance over the bin's own, `advancing_phase`).

    Returns:
      float32 audio `[B, frames * hop_length, channels]`.
    """
    head = head.astype(jnp.float32)
    log_mag, angle = jnp.split(head, 2, axis=-1)
    if phase == "advance":
        angle = advancing_phase(angle, hop_length, n_fft)
    mag = jnp.minimum(jnp.exp(log_mag), 1e2)
    spec = jax.lax.complex(mag * jnp.cos(angle), mag * jnp.sin(angle))
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
    phase: str = "absolute"
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
        return spectrum_to_audio(head, self.hop_length, self.n_fft, phase=self.phase)
