"""The CLAP audio tower: log-mel front end, convolutional stem, transformer, masked mean pooling.

Follows the audio side of CLAP (Elizalde et al. 2023; LAION-CLAP, Wu et al. 2023): log-mel features
computed inside the model, an encoder, a projection to the joint space and L2 normalisation. The
encoder is an Audio Spectrogram Transformer over time only (Gong et al. 2021, "AST"), with a
strided convolutional stem in place of patches (as Whisper's, Radford et al. 2022), so clips of any
length up to `max_seconds` are one sequence of frames with a padding mask.

Padding independence: samples outside `wave_mask` are zeroed; a frame counts as real only if its
whole analysis window lies inside the real samples; padding frames are zeroed before every
convolution and masked as attention keys and in the pooling. Hence a clip's embedding does not
depend on how much padding follows it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.audio import dsp
from ldm_jax.clap.text import ClapError, l2_normalize
from ldm_jax.nn.attention import Transformer
from ldm_jax.nn.embeddings import LearnedPositionEmbedding
from ldm_jax.nn.layers import conv, dense


def real_frames(length: jax.Array, n_fft: int, hop_length: int, num_frames: int) -> jax.Array:
    """How many centred STFT frames have their whole window inside `length` real samples.

    Frame t spans samples [t * hop - n_fft // 2, t * hop + n_fft // 2); the left reflection of
    the first frames uses real samples only. At least one frame counts, so pooling is defined.

    Args:
      length: int [B] real samples per clip.
      n_fft, hop_length: the STFT framing.
      num_frames: frames in the padded spectrogram (upper bound).

    Returns:
      int32 [B] in [1, num_frames].
    """
    n = (jnp.asarray(length, jnp.int32) - n_fft // 2) // hop_length + 1
    return jnp.clip(n, 1, num_frames)


def max_tokens(max_seconds: float, sample_rate: int, n_fft: int, hop_length: int, strides) -> int:
    """Sequence length of the transformer for the longest accepted clip."""
    samples = max(int(math.ceil(max_seconds * sample_rate)), n_fft)
    frames = 1 + samples // hop_length
    for s in strides:
        frames = -(-frames // s)
    return frames


class AudioEncoder(nn.Module):
    """Waveform -> frame states and a normalised joint-space embedding.

    Attributes:
      sample_rate: input sample rate (Hz).
      max_seconds: longest clip accepted (sizes the position table).
      n_fft, hop_length, n_mels, fmin, fmax: log-mel front end (`ldm_jax.audio.dsp.log_mel`).
      mel_offset, mel_scale: fixed standardisation of the log10-mel values.
      stem_strides: time strides of the kernel-3 convolutions of the stem (their product is the
        downsampling from mel frames to transformer positions).
      width: transformer width D.
      num_layers, num_heads, mlp_ratio, dropout_rate, remat: transformer shape.
      attention_impl: "xla" or "cudnn" (`ldm_jax.nn.attention`).
      embed_dim: joint embedding width E.
    """

    sample_rate: int
    max_seconds: float
    n_fft: int
    hop_length: int
    n_mels: int
    fmin: float
    fmax: float | None
    mel_offset: float
    mel_scale: float
    stem_strides: tuple[int, ...]
    width: int
    num_layers: int
    num_heads: int
    mlp_ratio: float
    embed_dim: int
    dropout_rate: float
    remat: bool
    dtype: jnp.dtype
    attention_impl: str = "xla"
    param_dtype: jnp.dtype = jnp.float32

    def features(self, wave: jax.Array, wave_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """Standardised log-mel frames and their count of real frames.

        Args:
          wave: float [B, T] or [B, T, C] (channels are averaged).
          wave_mask: bool [B, T], True at real samples; None: all real.

        Returns:
          mel: float32 [B, F, n_mels], zero at padding frames; n: int32 [B] real frames.
        """
        wave = jnp.asarray(wave, jnp.float32)
        if wave.ndim == 3:
            wave = jnp.mean(wave, axis=-1)
        if wave.ndim != 2:
            raise ClapError(f"audio must be [batch, time] or [batch, time, channels], got shape "
                             f"{wave.shape}")
        limit = max(int(math.ceil(self.max_seconds * self.sample_rate)), self.n_fft)
        if wave.shape[1] > limit:
            raise ClapError(f"clip of {wave.shape[1] / self.sample_rate:.2f} s is longer than "
                             f"model.audio.max_seconds={self.max_seconds}; crop it or raise "
                             "max_seconds")
        if wave_mask is None:
            wave_mask = jnp.ones(wave.shape, bool)
        wave_mask = jnp.asarray(wave_mask, bool)
        wave = jnp.where(wave_mask, wave, 0.0)
        length = jnp.sum(wave_mask, axis=1)
        if wave.shape[1] < self.n_fft:
            # Too short to reflect-pad: zeros keep the shape valid and are masked anyway.
            wave = jnp.pad(wave, [(0, 0), (0, self.n_fft - wave.shape[1])])
        mel = dsp.log_mel(wave, self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length,
                          n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax)
        mel = (mel - self.mel_offset) / self.mel_scale
        n = real_frames(length, self.n_fft, self.hop_length, mel.shape[1])
        frame_mask = jnp.arange(mel.shape[1]) < n[:, None]
        return jnp.where(frame_mask[..., None], mel, 0.0), n

    @nn.compact
    def __call__(self, wave: jax.Array, wave_mask: jax.Array | None = None, *,
                 train: bool = False) -> tuple[jax.Array, dict]:
        """Encodes clips.

        Args:
          wave: float [B, T] (or [B, T, C]) at `sample_rate`, T <= max_seconds * sample_rate.
          wave_mask: bool [B, T], True at real samples (a prefix of each row); None: all real.
          train: enables dropout (needs a `dropout` rng).

        Returns:
          states: [B, N, D] in `dtype` (zero at padding positions).
          aux: {"embedding": float32 [B, E] unit-norm, "mask": bool [B, N] real positions,
                "pooled": [B, D]}.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mel, n = self.features(wave, wave_mask)
        x = mel.astype(self.dtype)
        for i, stride in enumerate(self.stem_strides):
            x = conv(self.width, (3,), strides=(stride,), padding=((1, 1),),
                     names=("conv_in", "embed"), name=f"stem_{i}", **kw)(x)
            x = nn.gelu(x)
            n = (n + stride - 1) // stride
            x = jnp.where((jnp.arange(x.shape[1]) < n[:, None])[..., None], x, 0)
        mask = jnp.arange(x.shape[1]) < n[:, None]
        limit = max_tokens(self.max_seconds, self.sample_rate, self.n_fft, self.hop_length,
                           self.stem_strides)
        x = LearnedPositionEmbedding(limit, self.width, name="positions", **kw)(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = Transformer(self.num_layers, self.num_heads, self.mlp_ratio, self.dropout_rate,
                        remat=self.remat, attention_impl=self.attention_impl,
                        name="transformer", **kw)(x, mask, train=train)
        x = jnp.where(mask[..., None], x, 0)
        pooled = jnp.sum(x.astype(jnp.float32), axis=1) / n[:, None].astype(jnp.float32)
        projected = dense(self.embed_dim, ("embed", "joint"), use_bias=False, name="projection",
                          **kw)(
            pooled.astype(self.dtype))
        return x, {"embedding": l2_normalize(projected), "mask": mask, "pooled": pooled}
