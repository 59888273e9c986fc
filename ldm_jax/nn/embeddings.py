"""Sinusoidal and learned position embeddings, and diffusion timestep embeddings.

The sinusoidal form is that of "Attention Is All You Need" (Vaswani et al. 2017); as a timestep
embedding it follows DDPM (Ho et al. 2020) and guided-diffusion (Dhariwal & Nichol 2021): cosines
first, then sines, frequencies `max_period ** (-i / half)`, passed through a two-layer SiLU MLP.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.layers import dense, named


def sinusoidal_embedding(positions: jax.Array, dim: int, max_period: float = 10000.0,
                         ) -> jax.Array:
    """Fixed sinusoidal features of (possibly fractional) positions or timesteps.

    Args:
      positions: float or int array of any shape [...].
      dim: output features; an odd `dim` gets one trailing zero.
      max_period: the longest wavelength, in units of `positions`.

    Returns:
      float32 [..., dim]: `[cos(p w_0), ..., cos(p w_{h-1}), sin(p w_0), ..., sin(p w_{h-1})]`
      with `w_i = max_period ** (-i / h)`, `h = dim // 2`.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(positions, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    """Diffusion timestep embedding: sinusoidal features -> Dense -> SiLU -> Dense.

    Attributes:
      features: output width (4x the model width in DDPM's U-Net).
      frequency_dim: width of the sinusoidal features.
      max_period: see `sinusoidal_embedding`.
    """

    features: int
    frequency_dim: int = 256
    max_period: float = 10000.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """Args: t: [B] timesteps (integer or continuous). Returns: [B, features]."""
        x = sinusoidal_embedding(t, self.frequency_dim, self.max_period).astype(self.dtype)
        # A vector per example: its kernels stay whole ("cond_embed"), or GSPMD would split
        # its features and gather the batch of every block it conditions.
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.features, ("cond_embed", "cond_embed"), name="fc1", **kw)(x)
        x = nn.silu(x)
        return dense(self.features, ("cond_embed", "cond_embed"), name="fc2", **kw)(x)


class LearnedPositionEmbedding(nn.Module):
    """A learned table of `max_length` position vectors added to a sequence (BERT, CLIP).

    Sequences shorter than `max_length` use the first rows, so a padded and an unpadded copy of
    the same sequence get the same positions. The table's axes are `(position, embed)`.

    Attributes:
      max_length: the longest sequence accepted.
      features: width of the vectors (the model width).
      init_std: standard deviation of the initial table (CLIP uses 0.01).
    """

    max_length: int
    features: int
    init_std: float = 0.01
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x: [B, L, features], L <= max_length. Returns: x plus positions, [B, L, D]."""
        length = x.shape[-2]
        if length > self.max_length:
            raise ValueError(f"sequence of {length} positions is longer than the {self.max_length} "
                             "the model was built for; shorten the input or raise the maximum")
        table = self.param("position_embedding",
                           named(nn.initializers.normal(self.init_std), ("position", "embed")),
                           (self.max_length, self.features), self.param_dtype)
        return x + table[:length].astype(self.dtype)
