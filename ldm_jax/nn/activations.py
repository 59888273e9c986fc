"""Snake activation, `x + sin(alpha x)^2 / alpha` with a learned frequency per channel.

Ziyin, Hartwig & Ueda, "Neural Networks Fail to Learn Periodic Functions and How to Fix It"
(NeurIPS 2020); used per channel by BigVGAN and the Descript Audio Codec (`Snake1d`), whose
`1 / (alpha + 1e-9)` guard is kept so imported checkpoints give the same numbers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.layers import named


def snake(x: jax.Array, alpha: jax.Array) -> jax.Array:
    """Snake activation.

    Args:
      x: `[..., channels]`.
      alpha: `[channels]` frequencies.

    Returns:
      `x + sin(alpha * x)**2 / (alpha + 1e-9)`, shaped like `x`.
    """
    alpha = alpha.astype(x.dtype)
    return x + jnp.square(jnp.sin(alpha * x)) * jnp.reciprocal(alpha + 1e-9)


class Snake(nn.Module):
    """Snake with a learned `alpha` per channel (initialised to 1) on `[..., channels]`."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.param("alpha", named(nn.initializers.ones, ("conv_out",)), (x.shape[-1],),
                           self.param_dtype)
        return snake(x.astype(self.dtype), alpha)
