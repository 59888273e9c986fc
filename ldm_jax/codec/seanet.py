"""The SEANet encoder and decoder of EnCodec, channels last.

Défossez et al., "High Fidelity Neural Audio Compression" (EnCodec, 2022), after Tagliasacchi et
al.'s SEANet (2020): a first convolution, then per stride residual blocks (ELU, a dilated
convolution to `dim / compress` channels, ELU, a 1x1 convolution back, plus a 1x1 convolution
shortcut) and a strided convolution of kernel `2 * stride` that doubles the channels; a two-layer
LSTM with a skip connection; ELU and a last convolution to the latent width. The decoder mirrors it
with transposed convolutions that halve the channels.

Padding follows EnCodec's `SConv1d` exactly, so that checkpoints import with numerical parity
(`encodec_import.py`): a convolution of effective kernel `K = (k - 1) * d + 1` and stride `s` is
padded by `K - s` samples, all on the left when causal and split with the larger half on the
left otherwise, plus, on the right, the extra samples that make the last window full
(`ceil(T / s)` frames); the padding reflects the signal (`pad_mode="reflect"`), with EnCodec's
handling of inputs shorter than the padding. Transposed convolutions produce the full output
and trim `K - s` samples: on the right by `trim_right_ratio` when causal, split like the
convolutions otherwise.

`norm="weight_norm"` (the 24 kHz model) uses our weight-normalised convolutions (`weight_v`,
`weight_g`, `bias`); `norm="time_group_norm"` (the 48 kHz model) a plain convolution followed by
`GroupNorm(1, C)`, normalising each example over time and channels; `norm="none"` the plain
convolution alone.

Layouts: audio `[batch, samples, channels]`, latents `[batch, frames, dim]`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.conv import KERNEL_AXES, WNConv1d, WNConvTranspose1d
from ldm_jax.nn.layers import named

NORMS = ("weight_norm", "time_group_norm", "none")
PAD_MODES = ("reflect", "constant")

# ----------------------------------------------------------------------------------------------
# Pure functions.


def conv_padding(length: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 causal: bool = False) -> tuple[int, int]:
    """EnCodec's `(left, right)` padding of a convolution over `length` samples.

    The fixed padding `K - stride` (`K` the dilated kernel) goes to the left when causal, and
    is split `(total - total // 2, total // 2)` otherwise; the right side also gets the extra
    samples that make the last window full, so the output has `ceil(length / stride)` frames.
    """
    effective = (kernel_size - 1) * dilation + 1
    total = effective - stride
    extra = -length % stride  # EnCodec's `get_extra_padding_for_conv1d` with this total
    if causal:
        return total, extra
    right = total // 2
    return total - right, right + extra


def pad1d(x: jax.Array, left: int, right: int, mode: str = "reflect") -> jax.Array:
    """Pads the time axis of `[B, T, C]` like EnCodec's `pad1d`.

    Reflection needs more samples than the padding: a shorter input is first extended with
    zeros on the right, reflected, and the extension cut off again.
    """
    if mode == "constant":
        return jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    length = x.shape[1]
    widest = max(left, right)
    extension = widest - length + 1 if length <= widest else 0
    if extension:
        x = jnp.pad(x, ((0, 0), (0, extension), (0, 0)))
    y = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
    return y[:, :y.shape[1] - extension]


def transpose_trim(kernel_size: int, stride: int, causal: bool = False,
                   trim_right_ratio: float = 1.0) -> tuple[int, int]:
    """`(left, right)` samples EnCodec's `SConvTranspose1d` trims from the full output."""
    total = kernel_size - stride
    if causal:
        right = math.ceil(total * trim_right_ratio)
        return total - right, right
    right = total // 2
    return total - right, right


def time_group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float = 1e-5) -> jax.Array:
    """`GroupNorm(1, C)` on `[B, T, C]`: each example normalised over time and channels together
    (biased variance, as PyTorch), then scaled and shifted per channel."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def lstm_layer(x: jax.Array, kernel_ih: jax.Array, kernel_hh: jax.Array, bias_ih: jax.Array,
               bias_hh: jax.Array) -> jax.Array:
    """One PyTorch `nn.LSTM` layer over `[B, T, I]` from zero states.

    Gates are ordered (input, forget, cell, output) along the `4H` axis, as PyTorch stores them:
    `c' = σ(f) c + σ(i) tanh(g)`, `h' = σ(o) tanh(c')`.

    Args:
      x: `[B, T, I]` inputs.
      kernel_ih: `[I, 4H]` (PyTorch's `weight_ih` transposed).
      kernel_hh: `[H, 4H]`.
      bias_ih, bias_hh: `[4H]`; PyTorch adds both.

    Returns:
      `[B, T, H]` hidden states.
    """
    hidden = kernel_hh.shape[0]
    # The input projection of every step at once; only the recurrence is sequential.
    projected = x @ kernel_ih + bias_ih + bias_hh

    def step(carry, gates_x):
        h, c = carry
        gates = gates_x + h @ kernel_hh
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], hidden), projected.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(projected, 0, 1))
    return jnp.swapaxes(hs, 0, 1)


def conv_transpose_full(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """PyTorch's `conv_transpose1d` without padding: `[B, T, I]` -> `[B, (T - 1) s + k, O]`
    with a `[k, I, O]` kernel."""
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(
        x, jnp.flip(kernel, 0), window_strides=(1,), padding=[(k - 1, k - 1)],
        lhs_dilation=(stride,), dimension_numbers=("NWC", "WIO", "NWC"))


# ----------------------------------------------------------------------------------------------
# Layers.


def _uniform(bound: float):
    """U(-bound, bound), PyTorch's init of LSTM tensors."""
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _fan_in_uniform(fan_in_axes: tuple[int, ...]):
    """PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    def init(key, shape, dtype):
        fan_in = math.prod(shape[a] for a in fan_in_axes)
        return _uniform(1.0 / math.sqrt(fan_in))(key, shape, dtype)
    return init


class Conv1d(nn.Module):
    """A plain `Conv1d` (no padding) with a `[width, in, out]` kernel and a bias."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    transpose: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel_size, x.shape[-1], self.features)
        # PyTorch's default init; a transposed conv's fan-in is `out * k` there.
        fan_in_axes = (0, 2) if self.transpose else (0, 1)
        kernel = self.param("kernel", named(_fan_in_uniform(fan_in_axes), KERNEL_AXES), shape,
                            self.param_dtype)
        bias = self.param("bias", named(nn.initializers.zeros, ("conv_out",)),
                          (self.features,), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.transpose:
            y = conv_transpose_full(x, kernel, self.stride)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(self.stride,), padding=[(0, 0)],
                rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"))
        return y + bias.astype(self.dtype)


class TimeGroupNorm(nn.Module):
    """`time_group_norm` with a learned per-channel `scale` and `bias`."""

    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", named(nn.initializers.ones, ("conv_out",)), (c,),
                           self.param_dtype)
        bias = self.param("bias", named(nn.initializers.zeros, ("conv_out",)), (c,),
                          self.param_dtype)
        return time_group_norm(x, scale, bias, self.epsilon)


class SConv1d(nn.Module):
    """EnCodec's `SConv1d`: padding by `conv_padding` / `pad1d`, a convolution (`conv`) and, for
    `time_group_norm`, its norm (`norm`)."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    causal: bool = False
    norm: str = "weight_norm"
    pad_mode: str = "reflect"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Args: x `[B, T, C_in]`. Returns: `[B, ceil(T / stride), features]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        left, right = conv_padding(x.shape[1], self.kernel_size, self.stride, self.dilation,
                                   self.causal)
        x = pad1d(x, left, right, self.pad_mode)
        if self.norm == "weight_norm":
            return WNConv1d(self.features, self.kernel_size, stride=self.stride,
                            dilation=self.dilation, name="conv", **kw)(x)
        y = Conv1d(self.features, self.kernel_size, self.stride, self.dilation, name="conv",
                   **kw)(x)
        if self.norm == "time_group_norm":
            y = TimeGroupNorm(param_dtype=self.param_dtype, name="norm")(y)
        return y


class SConvTranspose1d(nn.Module):
    """EnCodec's `SConvTranspose1d`: the full transposed convolution, then `transpose_trim`."""

    features: int
    kernel_size: int
    stride: int
    causal: bool = False
    norm: str = "weight_norm"
    trim_right_ratio: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Args: x `[B, T, C_in]`. Returns: `[B, stride * T, features]`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.norm == "weight_norm":
            y = WNConvTranspose1d(self.features, self.kernel_size, stride=self.stride,
                                  name="conv", **kw)(x)
        else:
            y = Conv1d(self.features, self.kernel_size, self.stride, transpose=True,
                       name="conv", **kw)(x)
            if self.norm == "time_group_norm":
                y = TimeGroupNorm(param_dtype=self.param_dtype, name="norm")(y)
        left, right = transpose_trim(self.kernel_size, self.stride, self.causal,
                                     self.trim_right_ratio)
        return y[:, left:y.shape[1] - right]


class LSTM(nn.Module):
    """EnCodec's `SLSTM`: a `num_layers` PyTorch LSTM at the input width, plus the input.

    Layer `k` has the parameters `layer_{k}_kernel_ih` `[I, 4H]`, `layer_{k}_kernel_hh`
    `[H, 4H]` (PyTorch's `weight_ih_l{k}`, `weight_hh_l{k}` transposed), `layer_{k}_bias_ih` and
    `layer_{k}_bias_hh` `[4H]`; PyTorch's init U(-1/sqrt(H), 1/sqrt(H)).
    """

    num_layers: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x.shape[-1]
        init = lambda names: named(_uniform(1.0 / math.sqrt(h)), names)
        y = x.astype(self.dtype)
        for k in range(self.num_layers):
            params = [
                self.param(f"layer_{k}_kernel_ih", init(("conv_in", "mlp")), (h, 4 * h),
                           self.param_dtype),
                self.param(f"layer_{k}_kernel_hh", init(("conv_in", "mlp")), (h, 4 * h),
                           self.param_dtype),
                self.param(f"layer_{k}_bias_ih", init(("mlp",)), (4 * h,), self.param_dtype),
                self.param(f"layer_{k}_bias_hh", init(("mlp",)), (4 * h,), self.param_dtype),
            ]
            y = lstm_layer(y, *(p.astype(self.dtype) for p in params))
        return y + x.astype(self.dtype)


class ResnetBlock(nn.Module):
    """ELU, dilated conv to `dim // compress`, ELU, 1x1 conv to `dim`; plus a 1x1 conv shortcut
    (or the input itself with `true_skip`)."""

    dim: int
    kernel_size: int = 3
    dilation: int = 1
    compress: int = 2
    true_skip: bool = False
    causal: bool = False
    norm: str = "weight_norm"
    pad_mode: str = "reflect"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(causal=self.causal, norm=self.norm, pad_mode=self.pad_mode, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        y = SConv1d(self.dim // self.compress, self.kernel_size, dilation=self.dilation,
                    name="conv_0", **kw)(jax.nn.elu(x))
        y = SConv1d(self.dim, 1, name="conv_1", **kw)(jax.nn.elu(y))
        skip = x if self.true_skip else SConv1d(self.dim, 1, name="shortcut", **kw)(x)
        return skip + y


class SEANetEncoder(nn.Module):
    """Audio `[B, T, channels]` -> latents `[B, ceil(T / hop), latent_dim]`.

    Attributes:
      filters: width after the first convolution (EnCodec's `n_filters`), doubled per stride.
      rates: the strides in the order they apply (EnCodec's `ratios` reversed).
      latent_dim: the output width (EnCodec's `dimension`).
      residual_layers: residual blocks per stride, of dilations `dilation_base ** j`.
      lstm_layers: LSTM layers before the last convolution (0: none).
    """

    filters: int
    rates: tuple[int, ...]
    latent_dim: int
    residual_layers: int = 1
    lstm_layers: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    true_skip: bool = False
    causal: bool = False
    norm: str = "weight_norm"
    pad_mode: str = "reflect"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(causal=self.causal, norm=self.norm, pad_mode=self.pad_mode, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = SConv1d(self.filters, self.kernel_size, name="conv_in", **kw)(x)
        dim = self.filters
        for i, stride in enumerate(self.rates):
            for j in range(self.residual_layers):
                x = ResnetBlock(dim, self.residual_kernel_size, self.dilation_base ** j,
                                self.compress, self.true_skip, name=f"block_{i}_res_{j}",
                                **kw)(x)
            dim *= 2
            x = SConv1d(dim, 2 * stride, stride=stride, name=f"block_{i}_down",
                        **kw)(jax.nn.elu(x))
        if self.lstm_layers:
            x = LSTM(self.lstm_layers, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="lstm")(x)
        return SConv1d(self.latent_dim, self.last_kernel_size, name="conv_out",
                       **kw)(jax.nn.elu(x))


class SEANetDecoder(nn.Module):
    """Latents `[B, frames, latent_dim]` -> audio `[B, frames * hop, channels]` (unbounded: the
    released EnCodec decoders have no final activation).

    Attributes:
      dim: width after the first convolution (EnCodec's `n_filters * 2 ** len(ratios)`),
        halved per stride.
      rates: the upsampling strides in order (EnCodec's `ratios`).
    """

    dim: int
    rates: tuple[int, ...]
    channels: int = 1
    residual_layers: int = 1
    lstm_layers: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    true_skip: bool = False
    causal: bool = False
    norm: str = "weight_norm"
    pad_mode: str = "reflect"
    trim_right_ratio: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(causal=self.causal, norm=self.norm, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = SConv1d(self.dim, self.kernel_size, pad_mode=self.pad_mode, name="conv_in",
                    **kw)(z)
        if self.lstm_layers:
            x = LSTM(self.lstm_layers, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="lstm")(x)
        dim = self.dim
        for i, stride in enumerate(self.rates):
            dim //= 2
            x = SConvTranspose1d(dim, 2 * stride, stride, trim_right_ratio=self.trim_right_ratio,
                                 name=f"block_{i}_up", **kw)(jax.nn.elu(x))
            for j in range(self.residual_layers):
                x = ResnetBlock(dim, self.residual_kernel_size, self.dilation_base ** j,
                                self.compress, self.true_skip, pad_mode=self.pad_mode,
                                name=f"block_{i}_res_{j}", **kw)(x)
        x = SConv1d(self.channels, self.last_kernel_size, pad_mode=self.pad_mode,
                    name="conv_out", **kw)(jax.nn.elu(x))
        return x.astype(jnp.float32)
