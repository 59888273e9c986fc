"""The neural audio codec: a convolutional encoder, a bottleneck (RVQ or KL) and a decoder.

Architecture of the Descript Audio Codec (Kumar et al., "High-Fidelity Audio Compression with
Improved RVQGAN", NeurIPS 2023): strided weight-normalised convolutions with residual units of
dilations 1, 3, 9 and Snake activations, channels doubling per encoder block and halving per
decoder block, transposed-convolution upsampling with `kernel = 2 * stride` and
`padding = ceil(stride / 2)`. Parameter trees match DAC's state dict one to one (see
`convert.py`), and the official 16/24/44 kHz configurations are presets. `causal=True` pads
convolutions on the left only, for streaming.

Layouts are channels last: audio `[batch, samples, channels]`, latents `[batch, frames, dim]`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.codec import quantize, seanet
from ldm_jax.codec.istft_decoder import ISTFTDecoder
from ldm_jax.codec.quantize import CodecError
from ldm_jax.config import ConfigError, Section
from ldm_jax.nn.activations import Snake
from ldm_jax.nn.conv import WNConv1d, WNConvTranspose1d

ARCHITECTURES = ("dac", "seanet")
QUANTIZERS = ("dac_rvq", "ema_rvq", "fsq", "kl")
DECODERS = ("conv", "istft")


@dataclasses.dataclass(frozen=True)
class CodecConfig(Section):
    """Shape and training options of a codec (the `model` section of a codec experiment).

    `latent_dim=None` means `encoder_dim * 2 ** len(encoder_rates)`. `quantizer_dropout` is the
    probability that a training example uses a random number of codebooks.
    `transpose_output_padding` adds PyTorch's `output_padding = stride % 2` to the upsampling
    layers, so that odd strides give exactly `hop_length` samples per frame (the released DAC
    models were trained without it and give `stride * T - 1` per odd-stride layer). `dtype` is the
    compute dtype; parameters are kept in `param_dtype`.

    `quantizer="fsq"` quantises `n_codebooks` groups of `len(fsq_levels)` dimensions on the
    FSQ grid (one code per group per frame); its `codebook_size` is `prod(fsq_levels)`, set
    from the levels.

    `decoder="istft"` replaces DAC's transposed-convolution decoder by a ConvNeXt backbone of
    `istft_layers` blocks at width `decoder_dim` that predicts an STFT of `istft_n_fft` bins
    (0: four hops) with one frame per latent frame, inverted by the iSTFT
    (`istft_decoder.py`); `decoder_rates` are then unused.

    `architecture="seanet"` builds EnCodec's SEANet encoder and decoder (`seanet.py`) instead of
    DAC's: `encoder_dim` is EnCodec's `n_filters` (doubled per encoder stride), `decoder_dim` its
    `n_filters * 2 ** len(ratios)` (halved per decoder stride), `latent_dim` its `dimension`,
    `encoder_rates` its `ratios` reversed and `decoder_rates` its `ratios`; the `seanet_*` fields
    are the rest of its constructor arguments. EnCodec's bottleneck is `quantizer="ema_rvq"`
    with `codebook_dim = latent_dim`. `normalize` divides each clip by its volume (the RMS of
    its channel mean, plus 1e-8) before encoding and multiplies the decoded audio back (EnCodec
    48 kHz); `segment_seconds` > 0 and `segment_overlap` say that the model works on segments
    of that length overlapping by that fraction (EnCodec's `segment`, `overlap`): the module
    codes what it is given as one piece, `inference.LoadedCodec.encode_segments` and the CLI
    cut clips as EnCodec does. `target_bandwidths` (kbps) are the bitrates the model was
    trained for (`n_codebooks_for_bandwidth`).
    """

    LABEL: ClassVar[str] = "codec config"

    sample_rate: int = 44100
    channels: int = 1
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int | None = None
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    n_codebooks: int = 9
    codebook_size: int = 1024
    codebook_dim: int = 8
    quantizer: str = "dac_rvq"
    quantizer_dropout: float = 0.0
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    dead_code_threshold: float = 2.0
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    decoder: str = "conv"
    istft_n_fft: int = 0
    istft_layers: int = 8
    istft_mlp_ratio: float = 3.0
    istft_phase: str = "absolute"
    causal: bool = False
    transpose_output_padding: bool = False
    architecture: str = "dac"
    seanet_residual_layers: int = 1
    seanet_lstm_layers: int = 2
    seanet_kernel_size: int = 7
    seanet_last_kernel_size: int = 7
    seanet_residual_kernel_size: int = 3
    seanet_dilation_base: int = 2
    seanet_compress: int = 2
    seanet_true_skip: bool = False
    seanet_norm: str = "weight_norm"
    seanet_pad_mode: str = "reflect"
    seanet_trim_right_ratio: float = 1.0
    normalize: bool = False
    segment_seconds: float = 0.0
    segment_overlap: float = 0.01
    target_bandwidths: tuple[float, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("encoder_rates", "decoder_rates", "fsq_levels"):
            object.__setattr__(self, name, tuple(int(r) for r in getattr(self, name)))
        object.__setattr__(self, "target_bandwidths",
                           tuple(float(b) for b in self.target_bandwidths))
        for name in ("quantizer_dropout", "seanet_trim_right_ratio", "segment_seconds",
                     "segment_overlap"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"model.architecture={self.architecture!r} is unknown; use one of "
                              f"{', '.join(ARCHITECTURES)}")
        if self.architecture == "seanet":
            self._check_seanet()
        if self.segment_seconds < 0 or not 0.0 <= self.segment_overlap < 1.0:
            raise ConfigError("model.segment_seconds must be at least 0 (0: whole clips) and "
                              "model.segment_overlap in [0, 1)")
        if any(not b > 0 for b in self.target_bandwidths):
            raise ConfigError(f"model.target_bandwidths={list(self.target_bandwidths)} must be "
                              "positive kbps")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"model.quantizer={self.quantizer!r} is unknown; use one of "
                              f"{', '.join(QUANTIZERS)}")
        if not self.encoder_rates or min(self.encoder_rates + self.decoder_rates) < 1:
            raise ConfigError("model.encoder_rates and model.decoder_rates must be positive "
                              "integers")
        if self.quantizer == "fsq":
            if not self.fsq_levels or min(self.fsq_levels) < 2:
                raise ConfigError(f"model.fsq_levels={self.fsq_levels} must be at least 2 each")
            size = math.prod(self.fsq_levels)
            if size > quantize.FSQ_MAX_CODES:
                raise ConfigError(f"model.fsq_levels={self.fsq_levels} give {size} codes per "
                                  f"group; at most {quantize.FSQ_MAX_CODES}: use more groups "
                                  "(model.n_codebooks) of fewer levels")
            if self.quantizer_dropout:
                raise ConfigError("model.quantizer_dropout applies to residual codebooks; FSQ's "
                                  "groups are all used: set it to 0")
            object.__setattr__(self, "codebook_size", size)
        if self.decoder not in DECODERS:
            raise ConfigError(f"model.decoder={self.decoder!r} is unknown; use one of "
                              f"{', '.join(DECODERS)}")
        if self.decoder == "istft":
            if self.causal:
                raise ConfigError("model.decoder='istft' cannot be causal: each frame's window "
                                  "reaches into the next frames; use decoder='conv'")
            if self.istft_phase not in ("absolute", "advance"):
                raise ConfigError(f"model.istft_phase={self.istft_phase!r} is unknown; use "
                                  "'absolute' or 'advance'")
            if self.istft_layers < 1 or self.istft_mlp_ratio <= 0:
                raise ConfigError("model.istft_layers must be at least 1 and "
                                  "model.istft_mlp_ratio positive")
            if self.istft_n_fft and (self.istft_n_fft < self.hop_length
                                     or self.istft_n_fft % 2):
                raise ConfigError(f"model.istft_n_fft={self.istft_n_fft} must be even and at "
                                  f"least the hop ({self.hop_length}); 0 means four hops")
        elif self.decoder_dim % 2 ** len(self.decoder_rates):
            raise ConfigError(f"model.decoder_dim={self.decoder_dim} must be divisible by "
                              f"2**len(decoder_rates)={2 ** len(self.decoder_rates)}")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            raise ConfigError(f"model.quantizer_dropout={self.quantizer_dropout} must be a "
                              "probability in [0, 1]")
        if self.n_codebooks < 1 or self.codebook_size < 2 or self.codebook_dim < 1:
            raise ConfigError("model.n_codebooks, model.codebook_size and model.codebook_dim "
                              "must be positive (codebook_size at least 2)")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not a dtype") from e

    def _check_seanet(self):
        if self.seanet_norm not in seanet.NORMS:
            raise ConfigError(f"model.seanet_norm={self.seanet_norm!r} is unknown; use one of "
                              f"{', '.join(seanet.NORMS)}")
        if self.seanet_pad_mode not in seanet.PAD_MODES:
            raise ConfigError(f"model.seanet_pad_mode={self.seanet_pad_mode!r} is unknown; use "
                              f"one of {', '.join(seanet.PAD_MODES)}")
        if self.causal and self.seanet_norm == "time_group_norm":
            raise ConfigError("model.seanet_norm='time_group_norm' normalises over the whole "
                              "clip and cannot be causal: use weight_norm or causal=False")
        if not 0.0 <= self.seanet_trim_right_ratio <= 1.0 or (
                self.seanet_trim_right_ratio != 1.0 and not self.causal):
            raise ConfigError(f"model.seanet_trim_right_ratio={self.seanet_trim_right_ratio} "
                              "must be in [0, 1], and 1 unless the codec is causal")
        if min(self.seanet_kernel_size, self.seanet_last_kernel_size,
               self.seanet_residual_kernel_size, self.seanet_dilation_base,
               self.seanet_compress) < 1 or min(self.seanet_residual_layers,
                                                 self.seanet_lstm_layers) < 0:
            raise ConfigError("model.seanet_* kernel sizes, dilation_base and compress must be "
                              "positive, residual_layers and lstm_layers at least 0")
        if self.encoder_dim < self.seanet_compress:
            raise ConfigError(f"model.encoder_dim={self.encoder_dim} must be at least "
                              f"model.seanet_compress={self.seanet_compress}")

    @property
    def resolved_latent_dim(self) -> int:
        if self.latent_dim is not None:
            return int(self.latent_dim)
        return self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def resolved_istft_n_fft(self) -> int:
        return int(self.istft_n_fft) or 4 * self.hop_length

    def n_codebooks_for_bandwidth(self, bandwidth: float) -> int:
        """Codebooks sent at `bandwidth` kbps, as EnCodec counts them (`quantize.
        codebooks_for_bandwidth`); a codec with `target_bandwidths` takes only those."""
        if self.target_bandwidths and bandwidth not in self.target_bandwidths:
            raise CodecError(f"this codec was trained for the bandwidths "
                             f"{', '.join(f'{b:g}' for b in self.target_bandwidths)} kbps, "
                             f"not {bandwidth:g}")
        n = quantize.codebooks_for_bandwidth(bandwidth, self.codebook_size, self.frame_rate)
        return min(n, self.n_codebooks)


def normalize_volume(x: jax.Array, eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """EnCodec's audio normalisation: each clip divided by its volume.

    Args:
      x: `[B, T, C]` audio.
      eps: added to the volume, so silence divides by `eps`.

    Returns:
      `(x / scale, scale [B])` with `scale = sqrt(mean_t(mean_c(x)^2)) + eps`, the RMS of the
      channel mean.
    """
    mono = jnp.mean(x.astype(jnp.float32), axis=2)
    scale = jnp.sqrt(jnp.mean(jnp.square(mono), axis=1)) + eps
    return (x / scale[:, None, None]).astype(x.dtype), scale


def _dac(sample_rate, rates, n_codebooks, latent_dim=None):
    return CodecConfig(sample_rate=sample_rate, encoder_dim=64, encoder_rates=rates,
                       latent_dim=latent_dim, decoder_dim=1536, decoder_rates=rates[::-1],
                       n_codebooks=n_codebooks, codebook_size=1024, codebook_dim=8,
                       quantizer_dropout=0.5)


# The released DAC configurations (conf/final/*.yml; training uses quantizer dropout 0.5) and
# `dac_16khz_tiny`, a CPU-sized DAC at 16 kHz: the architecture of the reference fixture (the
# embedded experiments' codecs are `codec_tiny` and `codec`, experiment files, not presets).
PRESETS: dict[str, CodecConfig] = {
    "dac_44khz": _dac(44100, (2, 4, 8, 8), 9),
    "dac_44khz_16kbps": _dac(44100, (2, 4, 8, 8), 18, latent_dim=128),
    "dac_24khz": _dac(24000, (2, 4, 5, 8), 32),
    "dac_16khz": _dac(16000, (2, 4, 5, 8), 12),
    "dac_16khz_tiny": CodecConfig(
        sample_rate=16000, encoder_dim=16, encoder_rates=(2, 4, 5), latent_dim=64, decoder_dim=96,
        decoder_rates=(5, 4, 2), n_codebooks=4, codebook_size=64, codebook_dim=8,
        quantizer_dropout=0.5),
}


class ResidualUnit(nn.Module):
    """Snake, dilated width-7 conv, Snake, 1x1 conv, plus the input."""

    dim: int
    dilation: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Snake(name="snake_0", **kw)(x)
        y = WNConv1d(self.dim, 7, dilation=self.dilation, padding=3 * self.dilation,
                     causal=self.causal, name="conv_0", **kw)(y)
        y = Snake(name="snake_1", **kw)(y)
        y = WNConv1d(self.dim, 1, name="conv_1", **kw)(y)
        return x.astype(self.dtype) + y


class EncoderBlock(nn.Module):
    """Residual units at `dim // 2` channels, then a strided conv to `dim` channels."""

    dim: int
    stride: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, dilation in enumerate((1, 3, 9)):
            x = ResidualUnit(self.dim // 2, dilation, self.causal, name=f"res_{i}", **kw)(x)
        x = Snake(name="snake", **kw)(x)
        return WNConv1d(self.dim, 2 * self.stride, stride=self.stride,
                        padding=math.ceil(self.stride / 2), causal=self.causal, name="conv",
                        **kw)(x)


class Encoder(nn.Module):
    """Audio `[B, T, channels]` -> latents `[B, T / hop, latent_dim]`."""

    dim: int
    rates: tuple[int, ...]
    latent_dim: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(causal=self.causal, dtype=self.dtype, param_dtype=self.param_dtype)
        x = WNConv1d(self.dim, 7, padding=3, name="conv_in", **kw)(x)
        dim = self.dim
        for i, stride in enumerate(self.rates):
            dim *= 2
            x = EncoderBlock(dim, stride, name=f"block_{i}", **kw)(x)
        x = Snake(name="snake_out", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return WNConv1d(self.latent_dim, 3, padding=1, name="conv_out", **kw)(x)


class DecoderBlock(nn.Module):
    """Snake, transposed conv upsampling by `stride`, then residual units."""

    dim: int
    stride: int
    causal: bool = False
    output_padding: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Snake(name="snake", **kw)(x)
        x = WNConvTranspose1d(self.dim, 2 * self.stride, stride=self.stride,
                              padding=math.ceil(self.stride / 2),
                              output_padding=self.stride % 2 if self.output_padding else 0,
                              causal=self.causal, name="conv_t", **kw)(x)
        for i, dilation in enumerate((1, 3, 9)):
            x = ResidualUnit(self.dim, dilation, self.causal, name=f"res_{i}", **kw)(x)
        return x


class Decoder(nn.Module):
    """Latents `[B, frames, latent_dim]` -> audio `[B, samples, channels]` in [-1, 1]."""

    dim: int
    rates: tuple[int, ...]
    channels: int = 1
    causal: bool = False
    output_padding: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(causal=self.causal, dtype=self.dtype, param_dtype=self.param_dtype)
        x = WNConv1d(self.dim, 7, padding=3, name="conv_in", **kw)(z)
        for i, stride in enumerate(self.rates):
            x = DecoderBlock(self.dim // 2 ** (i + 1), stride, output_padding=self.output_padding,
                             name=f"block_{i}", **kw)(x)
        x = Snake(name="snake_out", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = WNConv1d(self.channels, 7, padding=3, name="conv_out", **kw)(x)
        return jnp.tanh(x.astype(jnp.float32))


class Codec(nn.Module):
    """Encoder, bottleneck and decoder with `encode` / `decode` / `decode_codes` entry points.

    Randomness in training comes from the rngs `quantizer` (quantizer dropout, dead-code
    restarts) and `noise` (KL sampling); the EMA quantizer also needs
    `mutable=["codebook_stats"]` when `train=True`.
    """

    config: CodecConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        latent = c.resolved_latent_dim
        if c.architecture == "seanet":
            self.encoder = seanet.SEANetEncoder(c.encoder_dim, c.encoder_rates, latent,
                                                **self._seanet_kwargs(), **kw)
        else:
            self.encoder = Encoder(c.encoder_dim, c.encoder_rates, latent, causal=c.causal,
                                   **kw)
        if c.quantizer == "dac_rvq":
            self.quantizer = quantize.ResidualVQ(latent, c.n_codebooks, c.codebook_size,
                                                 c.codebook_dim, c.quantizer_dropout, **kw)
        elif c.quantizer == "ema_rvq":
            self.quantizer = quantize.EMAResidualVQ(
                latent, c.n_codebooks, c.codebook_size, c.codebook_dim, c.quantizer_dropout,
                c.ema_decay, c.ema_epsilon, c.dead_code_threshold, **kw)
        elif c.quantizer == "fsq":
            self.quantizer = quantize.FSQ(latent, c.fsq_levels, c.n_codebooks, **kw)
        else:
            self.quantizer = quantize.KLBottleneck(latent, **kw)
        if c.decoder == "istft":
            self.decoder = ISTFTDecoder(c.decoder_dim, c.hop_length, c.resolved_istft_n_fft,
                                        c.istft_layers, c.istft_mlp_ratio, c.channels,
                                        phase=c.istft_phase, **kw)
        elif c.architecture == "seanet":
            self.decoder = seanet.SEANetDecoder(
                c.decoder_dim, c.decoder_rates, c.channels,
                trim_right_ratio=c.seanet_trim_right_ratio, **self._seanet_kwargs(), **kw)
        else:
            self.decoder = Decoder(c.decoder_dim, c.decoder_rates, c.channels, causal=c.causal,
                                   output_padding=c.transpose_output_padding, **kw)

    def _seanet_kwargs(self) -> dict:
        c = self.config
        return dict(residual_layers=c.seanet_residual_layers, lstm_layers=c.seanet_lstm_layers,
                    kernel_size=c.seanet_kernel_size, last_kernel_size=c.seanet_last_kernel_size,
                    residual_kernel_size=c.seanet_residual_kernel_size,
                    dilation_base=c.seanet_dilation_base, compress=c.seanet_compress,
                    true_skip=c.seanet_true_skip, causal=c.causal, norm=c.seanet_norm,
                    pad_mode=c.seanet_pad_mode)

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame."""
        return self.config.hop_length

    @property
    def frame_rate(self) -> float:
        """Latent frames per second."""
        return self.config.frame_rate

    def bitrate(self, n_codebooks: int | None = None) -> float:
        """Bits per second when sending `n_codebooks` codebooks (all by default)."""
        if self.config.quantizer == "kl":
            raise CodecError("a codec with the 'kl' bottleneck has no bitrate: it sends no codes")
        n = self.config.n_codebooks if n_codebooks is None else n_codebooks
        return quantize.bitrate(n, self.config.codebook_size, self.frame_rate)

    def _check_audio(self, x):
        if x.ndim != 3 or x.shape[-1] != self.config.channels:
            raise CodecError(f"the codec takes audio shaped [batch, samples, "
                             f"{self.config.channels}], got {tuple(x.shape)}")

    def encode(self, x: jax.Array, *, n_quantizers: int | None = None, train: bool = False):
        """Audio -> bottleneck output.

        Args:
          x: `[B, T, channels]`; right-padded with zeros to a multiple of `hop_length` (the
            SEANet encoder pads itself, as EnCodec, by reflection).
          n_quantizers: codebooks to use (static; all by default).
          train: quantizer dropout / EMA updates / KL sampling.

        Returns:
          `(z [B, ceil(T / hop), latent_dim], aux)`: `z` is the decoder input; `aux` holds `z_e`
          (encoder output), `latents`, `losses`, and for quantisers `codes` int32 `[B, T', K]`,
          `n_active` `[B]` and `stats`; for the KL bottleneck `mean` and `std`; with
          `normalize`, the `scale` `[B]` each clip was divided by (`decode` takes it back).
        """
        self._check_audio(x)
        pad = -x.shape[1] % self.hop_length
        if pad and self.config.architecture != "seanet":
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        extra = {}
        if self.config.normalize:
            x, extra["scale"] = normalize_volume(x)
        z_e = self.encoder(x)
        z, aux = self.quantizer(z_e, n_quantizers=n_quantizers, train=train)
        return z, {"z_e": z_e, **aux, **extra}

    def decode(self, z: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """Decoder input `[B, T', latent_dim]` -> audio `[B, samples, channels]` (float32; in
        [-1, 1] from the DAC conv decoder, unbounded from the SEANet and iSTFT ones), multiplied
        by `scale` `[B]` where given (the `scale` of a `normalize` codec's `encode`)."""
        audio = self.decoder(z)
        if scale is not None:
            audio = audio * jnp.asarray(scale, jnp.float32)[:, None, None]
        return audio

    def from_codes(self, codes: jax.Array) -> jax.Array:
        """Codes int `[B, T', k]` (the first k codebooks) -> decoder input `[B, T', latent_dim]`."""
        if self.config.quantizer == "kl":
            raise CodecError("decoding codes needs a quantised codec; this one has the 'kl' "
                             "bottleneck: decode its latents with decode()")
        return self.quantizer.from_codes(codes)[0]

    def decode_codes(self, codes: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """Codes int `[B, T', k]` (and a `normalize` codec's `scale` `[B]`) -> audio
        `[B, samples, channels]`."""
        return self.decode(self.from_codes(codes), scale)

    def __call__(self, x: jax.Array, *, n_quantizers: int | None = None, train: bool = False):
        """Encodes and decodes.

        Returns:
          `(audio [B, <= T, channels], aux)`: audio cut to the input length (as DAC: odd strides
          without `transpose_output_padding` give a few samples fewer); `aux` is `encode`'s plus
          `z`.
        """
        z, aux = self.encode(x, n_quantizers=n_quantizers, train=train)
        audio = self.decode(z, aux.get("scale"))[:, :x.shape[1]]
        return audio, {"z": z, **aux}


def make_model(cfg: CodecConfig | Mapping[str, Any] | str) -> Codec:
    """A `Codec` from a config, a dict / ConfigDict of its fields, or a preset name."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ConfigError(f"unknown codec preset {cfg!r}; use one of "
                              f"{', '.join(sorted(PRESETS))}")
        cfg = PRESETS[cfg]
    elif not isinstance(cfg, CodecConfig):
        cfg = CodecConfig.from_dict(cfg)
    return Codec(cfg)


make_codec = make_model


def init_variables(codec: Codec, rng: jax.Array, n_samples: int | None = None, *,
                   boxed: bool = False):
    """Initial variables (`params`, and `codebook_stats` for the EMA quantizer).

    Args:
      codec: the module.
      rng: PRNG key.
      n_samples: length of the dummy input (one hop by default; shapes do not depend on it).
      boxed: keep each array in the `nn.LogicallyPartitioned` box that names its axes (what
        `ldm_jax.parallel.tree_shardings` reads).

    Returns:
      The variables dict, plain arrays unless `boxed`.
    """
    n = n_samples or codec.config.hop_length
    x = jnp.zeros((1, n, codec.config.channels), jnp.float32)
    # One compiled program: initialising op by op compiles every distinct op on its own.
    variables = jax.jit(lambda r: codec.init({"params": r}, x))(rng)
    return variables if boxed else nn.meta.unbox(variables)
