"""Weight-normalised 1-D convolutions, channels last, with an optional causal (left-only) padding.

Weight normalisation follows Salimans & Kingma, "Weight Normalization" (2016): the kernel is
`g * v / ||v||`, the norm taken per `g` entry over all other axes. The parameters are named as in
PyTorch's `torch.nn.utils.weight_norm` (`weight_v`, `weight_g`, `bias`) so that checkpoints of the
Descript Audio Codec (Kumar et al., 2023) import by a transpose. As in PyTorch, a `Conv1d` has one
`g` per output channel and a `ConvTranspose1d` one `g` per input channel (PyTorch normalises over
dimension 0 of the stored kernel, which is the input axis of a transposed convolution).

Layouts: activations `[batch, time, channels]`; kernels `[width, in, out]` for both layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.layers import named

Dtype = Any

# Logical axis names of the convolution parameters (partition rules map them to mesh axes).
KERNEL_AXES = ("conv_width", "conv_in", "conv_out")


def weight_norm(v: jax.Array, g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Returns `g * v / ||v||` with the norm over `axes` (no epsilon, as PyTorch).

    Args:
      v: direction kernel, e.g. `[width, in, out]`.
      g: scales, shaped like `v` reduced over `axes` (without the reduced axes).
      axes: the axes the norm runs over.

    Returns:
      The effective kernel, shaped like `v`.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))
    return v * (jnp.expand_dims(g, axes) / norm)


def _direction_init(fan_in_axes: tuple[int, ...]):
    """PyTorch's default conv init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), ...)."""

    def init(key, shape, dtype):
        fan_in = 1
        for a in fan_in_axes:
            fan_in *= shape[a]
        bound = 1.0 / jnp.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _wn_params(module: nn.Module, shape, norm_axes, fan_in_axes, g_axis_name):
    """Creates `weight_v`, then `weight_g = ||weight_v||` so the initial kernel equals `v`."""
    v = module.param("weight_v", named(_direction_init(fan_in_axes), KERNEL_AXES), shape,
                     module.param_dtype)
    g_shape = tuple(s for i, s in enumerate(shape) if i not in norm_axes)
    g_init = lambda key, shape, dtype: jnp.sqrt(jnp.sum(jnp.square(v), axis=norm_axes)).astype(
        dtype)
    g = module.param("weight_g", named(g_init, (g_axis_name,)), g_shape,
                     module.param_dtype)
    return v, g


class WNConv1d(nn.Module):
    """Weight-normalised `Conv1d` on `[batch, time, channels]`.

    Attributes:
      features: output channels.
      kernel_size: kernel width.
      stride: time stride.
      dilation: kernel dilation.
      padding: zeros added on each side when not causal (PyTorch's `padding`).
      causal: pad `(kernel_size - 1) * dilation + 1 - stride` zeros on the left only, so output
        frame `t` sees inputs up to `t * stride + stride - 1` and the output has
        `ceil(time / stride)` frames, as many as the symmetric DAC paddings give.
      use_bias: add a bias per output channel.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    causal: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x `[B, T, C_in]`. Returns: `[B, T', features]`."""
        shape = (self.kernel_size, x.shape[-1], self.features)
        v, g = _wn_params(self, shape, norm_axes=(0, 1), fan_in_axes=(0, 1),
                          g_axis_name="conv_out")
        kernel = weight_norm(v.astype(jnp.float32), g.astype(jnp.float32), (0, 1))
        if self.causal:
            pad = ((self.kernel_size - 1) * self.dilation + 1 - self.stride, 0)
        else:
            pad = (self.padding, self.padding)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride,),
            padding=[pad], rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"))
        if self.use_bias:
            bias = self.param("bias", named(nn.initializers.zeros, ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class WNConvTranspose1d(nn.Module):
    """Weight-normalised `ConvTranspose1d` on `[batch, time, channels]` (PyTorch semantics).

    Non-causal output length is `(T - 1) * stride - 2 * padding + kernel_size + output_padding`;
    with DAC's `kernel_size = 2 * stride`, `padding = ceil(stride / 2)` that is `stride * T` for
    even strides and `stride * T - 1` for odd ones unless `output_padding = stride % 2`.
    Causal output keeps the first `stride * T` samples of the full transposed convolution, so
    output sample `t` depends only on input frames `<= t // stride`.

    Attributes:
      features: output channels.
      kernel_size: kernel width.
      stride: upsampling factor.
      padding: samples cropped from each side of the full output when not causal.
      output_padding: extra samples kept on the right when not causal.
      causal: crop only on the right (see above); `padding`/`output_padding` are then unused.
      use_bias: add a bias per output channel.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    causal: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x `[B, T, C_in]`. Returns: `[B, T', features]`."""
        k, s = self.kernel_size, self.stride
        shape = (k, x.shape[-1], self.features)
        # PyTorch stores [in, out, k] and normalises per input channel; fan-in is out * k there.
        v, g = _wn_params(self, shape, norm_axes=(0, 2), fan_in_axes=(0, 2),
                          g_axis_name="conv_in")
        kernel = weight_norm(v.astype(jnp.float32), g.astype(jnp.float32), (0, 2))
        if self.causal:
            pad = (k - 1, s - 1)
        else:
            pad = (k - 1 - self.padding, k - 1 - self.padding + self.output_padding)
        # A transposed convolution is a stride-1 correlation of the zero-stuffed input with the
        # time-reversed kernel.
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), jnp.flip(kernel, 0).astype(self.dtype), window_strides=(1,),
            padding=[pad], lhs_dilation=(s,), dimension_numbers=("NWC", "WIO", "NWC"))
        if self.use_bias:
            bias = self.param("bias", named(nn.initializers.zeros, ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
