"""GAN discriminators of the codec: multi-period, multi-band complex-STFT and multi-scale wave.

Follows the Descript Audio Codec (Kumar et al., 2023, "High-Fidelity Audio Compression with
Improved RVQGAN"), `dac/model/discriminator.py`:

- `PeriodDiscriminator` is HiFi-GAN's MPD (Kong et al., 2020): the waveform, reflect-padded to a
  whole number of periods, is folded to [frames, period] and judged by 2-D convs over frames;
- `STFTDiscriminator` is DAC's MRD: the complex STFT (real and imaginary parts as two channels,
  frames aligned to the hop as audiotools' `match_stride`) is split into frequency bands, each
  band has its own 2-D conv stack, and one conv over the re-joined bands gives the logits;
- `WaveDiscriminator` is MelGAN's MSD (Kumar et al., 2019) with DAC's layers: grouped strided
  1-D convs over the waveform average-pooled by `rate` (DAC resamples it with a sinc filter; DAC's
  default configuration leaves the MSD out);
- `MSSTFTDiscriminator` is one scale of EnCodec's MS-STFT discriminator (Défossez et al., 2022,
  `encodec/msstftd.py`; five scales of windows 2048 ... 128 in the paper): the whole-band
  complex STFT (no centring, normalised by the window's energy, real and imaginary parts as
  channels) judged by 2-D convs dilated 1, 2, 4 over frames and strided 2 over frequency, with
  LeakyReLU(0.2); its first conv is not weight-normalised, as in EnCodec. Off by default
  (`Discriminator.msstft_sizes`).

`Discriminator` runs them all on DAC-preprocessed audio (DC removed, peak at 0.8; EnCodec feeds
its MS-STFT discriminator the raw audio) and returns one
list of feature maps per sub-discriminator, logits last, as DAC does; `losses.py` consumes it.

Every conv is weight-normalised as in DAC (`weight_g * weight_v / ||weight_v||`, the norm over all
axes but the output one, `weight_g` initialised to `||weight_v||`, PyTorch's parameter names as in
`ldm_jax.nn.conv`, which holds only 1-D convs). Channels are last throughout: audio is
[batch, time, channels]; 2-D feature maps are [batch, frames, width, features].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.audio import dsp
from ldm_jax.nn.conv import weight_norm
from ldm_jax.nn.layers import named

# DAC's MRD frequency bands, as fractions of the STFT bins.
BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
LEAKY_SLOPE = 0.1

_DIMENSIONS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}
KERNEL_NAMES = {rank: ("conv_width",) * rank + ("conv_in", "conv_out") for rank in (1, 2)}


def _torch_like_uniform(fan_in: int):
    """PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for kernel and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class NormConv(nn.Module):
    """Weight-normalised N-D convolution with explicit PyTorch-style padding (channels last).

    Attributes:
      features: output channels.
      kernel_size: kernel extent per spatial axis (1 or 2 axes).
      strides: stride per spatial axis.
      padding: (low, high) zero padding per spatial axis.
      groups: feature groups (input and output channels must divide by it).
      weight_norm: False gives a plain conv (no `weight_g` parameter).
      dilation: kernel dilation per spatial axis (None: 1).
    """
    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    padding: Sequence[tuple[int, int]]
    groups: int = 1
    weight_norm: bool = True
    dilation: Sequence[int] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, *spatial, in] -> [batch, *spatial', features]."""
        rank = len(self.kernel_size)
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(f"conv with {self.groups} groups needs channels divisible by it, got "
                             f"{in_features} -> {self.features}")
        shape = (*self.kernel_size, in_features // self.groups, self.features)
        fan_in = math.prod(shape[:-1])
        kernel = self.param("weight_v", named(_torch_like_uniform(fan_in), KERNEL_NAMES[rank]),
                            shape, self.param_dtype)
        bias = self.param("bias", named(_torch_like_uniform(fan_in), ("conv_out",)),
                          (self.features,), self.param_dtype)
        if self.weight_norm:
            axes = tuple(range(rank + 1))
            # Starts at ||v||, so the effective kernel starts equal to v (torch's weight_norm).
            scale = self.param("weight_g", named(
                lambda _key: jnp.sqrt(jnp.sum(kernel ** 2, axis=axes)), ("conv_out",)))
            kernel = weight_norm(kernel.astype(jnp.float32), scale.astype(jnp.float32), axes)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides),
            [tuple(p) for p in self.padding], rhs_dilation=self.dilation and tuple(self.dilation),
            dimension_numbers=_DIMENSIONS[rank], feature_group_count=self.groups)
        return y + bias.astype(self.dtype)


def _widths(channels: int, multipliers: Sequence[float], max_channels: int) -> list[int]:
    return [max(1, min(int(channels * m), max_channels)) for m in multipliers]


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN / DAC multi-period sub-discriminator for one period.

    Attributes:
      period: fold length in samples.
      channels: width of the first conv (DAC: 32); later ones are 4x, 16x, 32x, 32x of it.
      max_channels: cap on conv widths (DAC: 1024).
    """
    period: int
    channels: int = 32
    max_channels: int = 1024
    weight_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """Judges mono audio.

        Args:
          x: [batch, time, 1] audio, time > period.

        Returns:
          Feature maps [batch, frames_k, period, width_k] after each conv (LeakyReLU applied),
          then the logits [batch, frames, period, 1].
        """
        batch, time, _ = x.shape
        # DAC always pads (a whole extra period when time is already a multiple).
        x = jnp.pad(x, ((0, 0), (0, self.period - time % self.period), (0, 0)), mode="reflect")
        x = x.reshape(batch, -1, self.period, 1)
        conv = lambda f, k, s, p, name: NormConv(f, k, s, p, weight_norm=self.weight_norm,
                                                 dtype=self.dtype, param_dtype=self.param_dtype,
                                                 name=name)
        fmaps = []
        widths = _widths(self.channels, (1, 4, 16, 32, 32), self.max_channels)
        for i, width in enumerate(widths):
            stride = 3 if i < len(widths) - 1 else 1
            x = conv(width, (5, 1), (stride, 1), ((2, 2), (0, 0)), f"conv_{i}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            fmaps.append(x)
        fmaps.append(conv(1, (3, 1), (1, 1), ((1, 1), (0, 0)), "conv_post")(x))
        return fmaps


def _stride_matched_stft(x: jax.Array, window_length: int, hop_length: int) -> jax.Array:
    """audiotools' `stft(match_stride=True)`: ceil(time / hop) frames aligned to conv strides.

    Args:
      x: [batch, time] audio.

    Returns:
      Complex [batch, ceil(time / hop), window_length // 2 + 1].
    """
    time = x.shape[-1]
    right = -(-time // hop_length) * hop_length - time
    pad = (window_length - hop_length) // 2
    if pad + right >= time:
        raise ValueError(f"audio of {time} samples is too short for the {window_length}-sample "
                         f"STFT discriminator; use clips longer than {pad + right} samples")
    x = jnp.pad(x, ((0, 0), (pad, pad + right)), mode="reflect")
    spec = dsp.stft(x, n_fft=window_length, hop_length=hop_length, win_length=window_length,
                    window="hann", center=True, pad_mode="reflect")
    # The two extra frames at each end come from the padding above.
    return spec[..., 2:-2, :]


class STFTDiscriminator(nn.Module):
    """DAC's multi-band complex-STFT sub-discriminator (MRD) for one window length.

    Attributes:
      window_length: STFT window and n_fft; the hop is window_length * hop_factor.
      hop_factor: hop as a fraction of the window (DAC: 0.25).
      bands: (low, high) fractions of the window_length // 2 + 1 bins, one conv stack each.
      channels: conv width (DAC: 32).
    """
    window_length: int
    hop_factor: float = 0.25
    bands: Sequence[tuple[float, float]] = BANDS
    channels: int = 32
    weight_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """Judges mono audio.

        Args:
          x: [batch, time, 1] audio.

        Returns:
          Per band, the feature maps [batch, frames, band_width_k, channels] after each of its
          five convs (LeakyReLU applied), bands in order; then the logits
          [batch, frames, sum of final band widths, 1].
        """
        hop = int(self.window_length * self.hop_factor)
        spec = _stride_matched_stft(x[..., 0].astype(jnp.float32), self.window_length, hop)
        spec = jnp.stack([spec.real, spec.imag], axis=-1)
        n_bins = self.window_length // 2 + 1
        conv = lambda k, s, p, name: NormConv(
            self.channels, k, s, p, weight_norm=self.weight_norm, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name)
        # (kernel, stride, padding) over (frames, bins): only the bins are strided.
        layers = ([((3, 9), (1, 1), ((1, 1), (4, 4)))] + [((3, 9), (1, 2), ((1, 1), (4, 4)))] * 3
                  + [((3, 3), (1, 1), ((1, 1), (1, 1)))])
        fmaps, outputs = [], []
        for b, (low, high) in enumerate(self.bands):
            h = spec[:, :, int(low * n_bins):int(high * n_bins)]
            for i, (kernel, stride, padding) in enumerate(layers):
                h = nn.leaky_relu(conv(kernel, stride, padding, f"band_{b}_conv_{i}")(h),
                                  LEAKY_SLOPE)
                fmaps.append(h)
            outputs.append(h)
        logits = NormConv(1, (3, 3), (1, 1), ((1, 1), (1, 1)), weight_norm=self.weight_norm,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name="conv_post")(jnp.concatenate(outputs, axis=2))
        fmaps.append(logits)
        return fmaps


class WaveDiscriminator(nn.Module):
    """MelGAN / DAC multi-scale waveform sub-discriminator at one rate.

    Attributes:
      rate: the waveform is average-pooled by this factor first (1 = full rate).
      channels: base width (DAC: 32): convs are 0.5x, 2x, 8x, 32x, 32x, 32x of it, the strided
        ones grouped with 4 input channels per group.
      max_channels: cap on conv widths (DAC: 1024).
    """
    rate: int = 1
    channels: int = 32
    max_channels: int = 1024
    weight_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """Judges mono audio.

        Args:
          x: [batch, time, 1] audio.

        Returns:
          Feature maps [batch, time_k, width_k] after each of six convs (LeakyReLU applied),
          then the logits [batch, time_k, 1].
        """
        if self.rate > 1:
            x = nn.avg_pool(x, (self.rate,), strides=(self.rate,), padding="VALID")
        widths = _widths(self.channels, (0.5, 2, 8, 32, 32, 32), self.max_channels)
        specs = [(15, 1, 7, False)] + [(41, 4, 20, True)] * 4 + [(5, 1, 2, False)]
        fmaps = []
        in_width = x.shape[-1]
        for i, (width, (kernel, stride, pad, grouped)) in enumerate(zip(widths, specs)):
            groups = math.gcd(math.gcd(max(1, in_width // 4), in_width), width) if grouped else 1
            x = NormConv(width, (kernel,), (stride,), ((pad, pad),), groups=groups,
                         weight_norm=self.weight_norm, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=f"conv_{i}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            fmaps.append(x)
            in_width = width
        fmaps.append(NormConv(1, (3,), (1,), ((1, 1),), weight_norm=self.weight_norm,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              name="conv_post")(x))
        return fmaps


def normalized_stft(x: jax.Array, n_fft: int, hop_length: int) -> jax.Array:
    """EnCodec's discriminator spectrogram (torchaudio's `Spectrogram(normalized=True,
    center=False, power=None)` with a periodic Hann window of `n_fft`).

    Args:
      x: [batch, time] audio, time >= n_fft.

    Returns:
      Complex [batch, 1 + (time - n_fft) // hop_length, n_fft // 2 + 1], divided by the square
      root of the window's energy.
    """
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    spec = dsp.stft(x, n_fft=n_fft, hop_length=hop_length, win_length=n_fft, window="hann",
                    center=False)
    return spec / np.float32(np.sqrt(np.sum(window ** 2)))


class MSSTFTDiscriminator(nn.Module):
    """One scale of EnCodec's multi-scale complex-STFT discriminator.

    Attributes:
      n_fft: STFT size and window length; the hop is `n_fft // 4` (EnCodec's scales).
      channels: conv width (EnCodec's `filters`: 32).
      max_channels: cap on conv widths (EnCodec: 1024).
      dilations: time dilations of the strided convs (EnCodec: 1, 2, 4).
    """
    n_fft: int
    channels: int = 32
    max_channels: int = 1024
    dilations: Sequence[int] = (1, 2, 4)
    weight_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """Judges mono audio.

        Args:
          x: [batch, time, 1] audio, time >= n_fft.

        Returns:
          Feature maps [batch, frames, bins_k, width] after each of its convs (LeakyReLU 0.2
          applied), then the logits [batch, frames, bins_k, 1].
        """
        spec = normalized_stft(x[..., 0].astype(jnp.float32), self.n_fft, self.n_fft // 4)
        h = jnp.stack([spec.real, spec.imag], axis=-1)
        width = min(self.channels, self.max_channels)
        conv = lambda f, k, s, p, name, d=None, wn=self.weight_norm: NormConv(
            f, k, s, p, weight_norm=wn, dilation=d, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name)
        # (frames, bins) kernels; EnCodec's first conv has no norm.
        layers = [conv(width, (3, 9), (1, 1), ((1, 1), (4, 4)), "conv_0", wn=False)]
        layers += [conv(width, (3, 9), (1, 2), ((d, d), (4, 4)), f"conv_{i + 1}", (d, 1))
                   for i, d in enumerate(self.dilations)]
        layers.append(conv(width, (3, 3), (1, 1), ((1, 1), (1, 1)),
                           f"conv_{len(self.dilations) + 1}"))
        fmaps = []
        for layer in layers:
            h = nn.leaky_relu(layer(h), 0.2)
            fmaps.append(h)
        fmaps.append(conv(1, (3, 3), (1, 1), ((1, 1), (1, 1)), "conv_post")(h))
        return fmaps


def preprocess(x: jax.Array) -> jax.Array:
    """DAC's discriminator input: DC offset removed, then peak-normalised to 0.8 per channel.

    Args:
      x: [batch, time, channels] audio.

    Returns:
      [batch, time, channels] float32.
    """
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=1, keepdims=True)
    return 0.8 * x / (jnp.max(jnp.abs(x), axis=1, keepdims=True) + 1e-9)


class Discriminator(nn.Module):
    """DAC's combined discriminator: MPD per period, MSD per rate, MRD per FFT size (that order).

    Attributes:
      periods: MPD periods (DAC: 2, 3, 5, 7, 11); empty disables it.
      fft_sizes: MRD window lengths (DAC: 2048, 1024, 512); empty disables it.
      bands: MRD frequency bands as fractions of the bins.
      rates: MSD pooling factors, e.g. (1, 2, 4); empty (DAC's default) disables it.
      channels: base conv width (DAC: 32; smaller for tests and tiny models).
      max_channels: cap on conv widths (DAC: 1024).
      sample_rate: the audio's sample rate. Every sub-discriminator here works in samples, so it
        only records the rate the windows were chosen for (DAC's MSD uses it to resample to
        sample_rate // rate; this MSD average-pools by `rate` instead, as MelGAN does).
      weight_norm: weight-normalised convs as in DAC.
      msstft_sizes: EnCodec MS-STFT scales (window lengths, e.g. 2048, 1024, 512, 256, 128);
        empty (the default) disables them.
    """
    periods: Sequence[int] = (2, 3, 5, 7, 11)
    fft_sizes: Sequence[int] = (2048, 1024, 512)
    bands: Sequence[tuple[float, float]] = BANDS
    rates: Sequence[int] = ()
    msstft_sizes: Sequence[int] = ()
    channels: int = 32
    max_channels: int = 1024
    sample_rate: int = 44100
    weight_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[list[jax.Array]]:
        """Runs every sub-discriminator.

        Args:
          x: [batch, time, channels] audio; each channel is judged as its own example (the
            feature maps' batch is batch * channels).

        Returns:
          One list per sub-discriminator (periods, then rates, then FFT sizes, then MS-STFT
          scales), each holding its feature maps and, last, its logits.
        """
        if x.ndim != 3:
            raise ValueError(f"discriminator input must be [batch, time, channels], got {x.shape}")
        batch, time, channels = x.shape
        x = preprocess(x)
        x = jnp.swapaxes(x, 1, 2).reshape(batch * channels, time, 1)
        common = dict(weight_norm=self.weight_norm, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        discs = [PeriodDiscriminator(p, self.channels, self.max_channels, name=f"period_{p}",
                                     **common) for p in self.periods]
        discs += [WaveDiscriminator(r, self.channels, self.max_channels, name=f"rate_{r}",
                                    **common) for r in self.rates]
        discs += [STFTDiscriminator(n, bands=tuple(map(tuple, self.bands)),
                                    channels=self.channels, name=f"stft_{n}", **common)
                  for n in self.fft_sizes]
        discs += [MSSTFTDiscriminator(n, self.channels, self.max_channels, name=f"msstft_{n}",
                                      **common) for n in self.msstft_sizes]
        return [d(x) for d in discs]
