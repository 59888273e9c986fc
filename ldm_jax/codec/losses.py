"""Codec training losses: multi-scale mel and STFT distances, waveform L1, SI-SDR, GAN and KL.

Follows the Descript Audio Codec (Kumar et al., 2023, "High-Fidelity Audio Compression with
Improved RVQGAN"), `dac/nn/loss.py`, whose spectral losses come from descript-audiotools
(`audiotools/metrics/spectral.py`, `AudioSignal.stft` / `mel_spectrogram`):

- STFTs use a periodic Hann window of the window length, hop = window // 4, `n_fft` = window
  length, centred frames with reflect padding, and no stride matching;
- mel spectrograms are magnitudes (not powers) through a Slaney-normalised librosa filterbank;
- distances are L1 means of `log10(clamp(S, eps) ** pow)` plus `mag_weight` times the L1 of `S`.

The multi-scale STFT loss is the DDSP loss (Engel et al., 2020). The adversarial losses are the
least-squares GAN (Mao et al., 2017) used by DAC and HiFi-GAN, and the hinge loss (Lim & Ye,
2017) used by SoundStream / EnCodec. Feature matching is MelGAN's (Kumar et al., 2019). Every
function is pure jax.numpy, safe under `jit` and `grad`.

Audio arguments are `[batch, time, channels]` (or `[batch, time]`); the estimate comes first
and the reference second, as in DAC's `loss(recons, signal)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from ldm_jax.audio import dsp

# DAC's `lambdas` (conf/base.yml), keyed by the names the metrics are logged under. The KL weight
# is stable-audio-tools' VAE bottleneck weight.
DEFAULT_LOSS_WEIGHTS = {
    "mel/loss": 15.0,
    "adv/feat_loss": 2.0,
    "adv/gen_loss": 1.0,
    "vq/commitment_loss": 0.25,
    "vq/codebook_loss": 1.0,
    "kl/loss": 1e-4,
}

# DAC's MelSpectrogramLoss setup (conf/base.yml).
MEL_WINDOW_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_N_MELS = (5, 10, 20, 40, 80, 160, 320)

_HIGHEST = jax.lax.Precision.HIGHEST


def _time_last(x: jax.Array) -> jax.Array:
    """[batch, time, channels] -> [batch, channels, time]; [batch, time] is kept."""
    if x.ndim == 3:
        return jnp.swapaxes(x, -1, -2)
    if x.ndim == 2:
        return x
    raise ValueError(f"audio must be [batch, time, channels] or [batch, time], got shape {x.shape}")


def _stacked(estimate: jax.Array, reference: jax.Array) -> jax.Array:
    """[batch, 2, (channels,) time]: both signals through one STFT per scale.

    The batch stays the leading axis so that a batch-sharded STFT transforms each device's own
    examples (see `dsp.stft`).
    """
    return jnp.stack([_time_last(estimate), _time_last(reference)], axis=1).astype(jnp.float32)


def _unstacked(both: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The estimate's and the reference's halves of a `_stacked` array."""
    return both[:, 0], both[:, 1]


def _check_pair(estimate: jax.Array, reference: jax.Array, min_length: int = 0):
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate {estimate.shape} and reference {reference.shape} differ in "
                         "shape; crop or pad them to the same length first")
    time = estimate.shape[1] if estimate.ndim >= 2 else estimate.shape[0]
    if time <= min_length:
        raise ValueError(f"audio of {time} samples is too short for a {2 * min_length}-sample STFT "
                         f"window; use clips longer than {min_length} samples or smaller windows")


def _magnitude(x: jax.Array, window_length: int, window: str) -> jax.Array:
    """|STFT| as audiotools computes it: [..., time] -> [..., frames, window_length // 2 + 1]."""
    spec = dsp.stft(x, n_fft=window_length, hop_length=window_length // 4,
                    win_length=window_length, window=window, center=True, pad_mode="reflect")
    return jnp.abs(spec)


def _log_l1(a: jax.Array, b: jax.Array, clamp_eps: float, power: float) -> jax.Array:
    def compress(s):
        return jnp.log10(jnp.power(jnp.maximum(s, clamp_eps), power))
    return jnp.mean(jnp.abs(compress(a) - compress(b)))


def _per_scale(values, count: int, default, name: str) -> tuple:
    if values is None:
        return (default,) * count
    values = tuple(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but there are {count} window lengths; "
                         "give one per window length")
    return values


def mel_loss(estimate: jax.Array, reference: jax.Array, sample_rate: int, *,
             window_lengths: Sequence[int] = MEL_WINDOW_LENGTHS,
             n_mels: Sequence[int] = MEL_N_MELS, clamp_eps: float = 1e-5,
             mag_weight: float = 0.0, log_weight: float = 1.0, power: float = 1.0,
             fmin: Sequence[float] | None = None, fmax: Sequence[float | None] | None = None,
             window: str = "hann") -> jax.Array:
    """Multi-scale mel-spectrogram distance, DAC's `MelSpectrogramLoss` as configured for training.

    For each scale: the magnitude STFT (hop = window // 4), a Slaney mel filterbank from `fmin`
    (default 0) to `fmax` (default sample_rate / 2), then
    `log_weight * L1(log10(clamp(M, eps) ** power)) + mag_weight * L1(M)`; scales are summed.

    Args:
      estimate: reconstructed audio, [batch, time, channels] or [batch, time].
      reference: target audio, same shape; time must exceed max(window_lengths) // 2.
      sample_rate: sample rate in Hz (sets the mel filterbank).
      window_lengths: STFT window (= n_fft) per scale.
      n_mels: mel bands per scale.
      clamp_eps: lower clamp before the log.
      mag_weight: weight of the linear mel L1 term.
      log_weight: weight of the log-mel L1 term.
      power: exponent applied to the clamped mel magnitudes before log10.
      fmin: lowest mel frequency per scale (Hz), None for 0.
      fmax: highest mel frequency per scale (Hz, entries may be None), None for Nyquist.
      window: window name understood by `dsp.stft`.

    Returns:
      Scalar float32 loss.
    """
    _check_pair(estimate, reference, max(window_lengths) // 2)
    count = len(window_lengths)
    n_mels = _per_scale(n_mels, count, None, "n_mels")
    fmin = _per_scale(fmin, count, 0.0, "fmin")
    fmax = _per_scale(fmax, count, None, "fmax")
    both = _stacked(estimate, reference)
    loss = jnp.zeros((), jnp.float32)
    for length, mels, lo, hi in zip(window_lengths, n_mels, fmin, fmax):
        basis = jnp.asarray(dsp.mel_filterbank(sample_rate, length, n_mels=mels, fmin=lo,
                                               fmax=hi, htk=False, norm="slaney"))
        x_mel, y_mel = _unstacked(jnp.matmul(_magnitude(both, length, window), basis,
                                             precision=_HIGHEST))
        loss += log_weight * _log_l1(x_mel, y_mel, clamp_eps, power)
        loss += mag_weight * jnp.mean(jnp.abs(x_mel - y_mel))
    return loss


def multiscale_stft_loss(estimate: jax.Array, reference: jax.Array, *,
                         window_lengths: Sequence[int] = (2048, 512), clamp_eps: float = 1e-5,
                         mag_weight: float = 1.0, log_weight: float = 1.0, power: float = 2.0,
                         window: str = "hann") -> jax.Array:
    """Multi-scale STFT distance, DAC's `MultiScaleSTFTLoss` (defaults are its defaults).

    Per scale: `log_weight * L1(log10(clamp(|X|, eps) ** power)) + mag_weight * L1(|X|)` with a
    hop of window // 4; scales are summed.

    Args:
      estimate: reconstructed audio, [batch, time, channels] or [batch, time].
      reference: target audio, same shape; time must exceed max(window_lengths) // 2.
      window_lengths: STFT window (= n_fft) per scale.
      clamp_eps: lower clamp before the log.
      mag_weight: weight of the linear magnitude L1 term.
      log_weight: weight of the log-magnitude L1 term.
      power: exponent applied to the clamped magnitudes before log10.
      window: window name understood by `dsp.stft`.

    Returns:
      Scalar float32 loss.
    """
    _check_pair(estimate, reference, max(window_lengths) // 2)
    both = _stacked(estimate, reference)
    loss = jnp.zeros((), jnp.float32)
    for length in window_lengths:
        x_mag, y_mag = _unstacked(_magnitude(both, length, window))
        loss += log_weight * _log_l1(x_mag, y_mag, clamp_eps, power)
        loss += mag_weight * jnp.mean(jnp.abs(x_mag - y_mag))
    return loss


def waveform_l1(estimate: jax.Array, reference: jax.Array) -> jax.Array:
    """Mean absolute sample difference (DAC's `L1Loss` on `audio_data`). Any equal shapes."""
    _check_pair(estimate, reference)
    return jnp.mean(jnp.abs(estimate.astype(jnp.float32) - reference.astype(jnp.float32)))


def level_loss(estimate: jax.Array, reference: jax.Array, *, frame: int = 1024,
               floor: float = 1e-8) -> jax.Array:
    """Mean absolute difference of frame energies, in log10 units (bels).

    The frames' mean squares, `log10(mean(y²) + floor)` against the reference's, over
    non-overlapping frames of `frame` samples (channels pooled). A log-spectral L1 such as
    `mel_loss` is minimised by the median over what the decoder cannot tell apart (which of
    several partials sounds, where a note's energy lies), and that median carries less energy
    than the reference; the energy of a whole frame has no such ambiguity, so this term holds
    the level without matching any gain at decode time.

    Args:
      estimate, reference: audio `[batch, time, channels]` or `[batch, time]`; the time is cut
        to whole frames (at least one).
      frame: samples per frame.
      floor: added to the mean squares (silence measures -8 bels).

    Returns:
      Scalar float32 loss.
    """
    _check_pair(estimate, reference)
    if estimate.shape[1] < frame:
        raise ValueError(f"audio of {estimate.shape[1]} samples is shorter than one level frame "
                         f"of {frame}; use longer clips or a shorter frame")
    both = _stacked(estimate, reference)  # [B, 2, (C,) T]
    n = both.shape[-1] // frame
    power = jnp.mean(jnp.square(both[..., :n * frame].reshape(both.shape[:-1] + (n, frame))),
                     axis=-1)
    if power.ndim == 4:  # channels pooled
        power = jnp.mean(power, axis=2)
    y, x = _unstacked(jnp.log10(power + floor))
    return jnp.mean(jnp.abs(y - x))


def si_sdr(estimate: jax.Array, reference: jax.Array, *, scaling: bool = True,
           zero_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019), per example.

    Matches audiotools' / DAC's `SISDRLoss` (before its sign flip): channels and time of each
    example are flattened, optionally zero-meaned, the reference is scaled by
    `(<e, r> + eps) / (||r||^2 + eps)` and the ratio is `10 log10(||s||^2 / ||e - s||^2 + eps)`.

    Args:
      estimate: [batch, ...] estimated audio.
      reference: [batch, ...] reference audio, same shape.
      scaling: False gives the plain (scale-dependent) SDR.
      zero_mean: remove each example's mean first.
      eps: stabiliser, as in audiotools.

    Returns:
      [batch] float32 SI-SDR in dB (higher is better).
    """
    _check_pair(estimate, reference)
    batch = estimate.shape[0]
    est = estimate.reshape(batch, -1).astype(jnp.float32)
    ref = reference.reshape(batch, -1).astype(jnp.float32)
    if zero_mean:
        est = est - jnp.mean(est, axis=1, keepdims=True)
        ref = ref - jnp.mean(ref, axis=1, keepdims=True)
    if scaling:
        scale = ((jnp.sum(est * ref, axis=1, keepdims=True) + eps)
                 / (jnp.sum(ref * ref, axis=1, keepdims=True) + eps))
    else:
        scale = 1.0
    target = scale * ref
    signal = jnp.sum(target * target, axis=1)
    noise = jnp.sum((est - target) ** 2, axis=1)
    return 10.0 * jnp.log10(signal / noise + eps)


def si_sdr_loss(estimate: jax.Array, reference: jax.Array, *, clip_min: float | None = None,
                **kwargs) -> jax.Array:
    """Negative SI-SDR averaged over the batch (audiotools' `SISDRLoss`, reduction "mean").

    Args:
      estimate: [batch, ...] estimated audio.
      reference: [batch, ...] reference audio.
      clip_min: the per-example loss is clamped below at this value (stop improving examples
        that are already good), None for no clamp.
      **kwargs: passed to `si_sdr` (scaling, zero_mean, eps).

    Returns:
      Scalar float32 loss (lower is better).
    """
    loss = -si_sdr(estimate, reference, **kwargs)
    if clip_min is not None:
        loss = jnp.maximum(loss, clip_min)
    return jnp.mean(loss)


# Discriminator outputs: one list of feature maps per sub-discriminator, logits last.
FeatureMaps = Sequence[Sequence[jax.Array]]


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def lsgan_discriminator_loss(d_fake: FeatureMaps, d_real: FeatureMaps) -> jax.Array:
    """Least-squares discriminator loss: sum over discriminators of E[D(fake)^2] + E[(1-D(real))^2].

    Args:
      d_fake: discriminator outputs on generated audio (feature-map lists, logits last); the
        caller stops the generator gradient (DAC detaches the fake audio).
      d_real: discriminator outputs on real audio.

    Returns:
      Scalar float32 loss.
    """
    loss = jnp.zeros((), jnp.float32)
    for fake, real in zip(d_fake, d_real, strict=True):
        loss += jnp.mean(jnp.square(_f32(fake[-1])))
        loss += jnp.mean(jnp.square(1.0 - _f32(real[-1])))
    return loss


def lsgan_generator_loss(d_fake: FeatureMaps) -> jax.Array:
    """Least-squares generator loss: sum over discriminators of E[(1 - D(fake))^2].

    Args:
      d_fake: discriminator outputs on generated audio (feature-map lists, logits last).

    Returns:
      Scalar float32 loss.
    """
    loss = jnp.zeros((), jnp.float32)
    for fake in d_fake:
        loss += jnp.mean(jnp.square(1.0 - _f32(fake[-1])))
    return loss


def hinge_discriminator_loss(d_fake: FeatureMaps, d_real: FeatureMaps) -> jax.Array:
    """Hinge discriminator loss: sum of E[relu(1 - D(real))] + E[relu(1 + D(fake))].

    Args:
      d_fake: discriminator outputs on generated audio (feature-map lists, logits last).
      d_real: discriminator outputs on real audio.

    Returns:
      Scalar float32 loss.
    """
    loss = jnp.zeros((), jnp.float32)
    for fake, real in zip(d_fake, d_real, strict=True):
        loss += jnp.mean(jax.nn.relu(1.0 - _f32(real[-1])))
        loss += jnp.mean(jax.nn.relu(1.0 + _f32(fake[-1])))
    return loss


def hinge_generator_loss(d_fake: FeatureMaps) -> jax.Array:
    """Hinge generator loss as in SoundStream / EnCodec: sum of E[relu(1 - D(fake))].

    Args:
      d_fake: discriminator outputs on generated audio (feature-map lists, logits last).

    Returns:
      Scalar float32 loss.
    """
    loss = jnp.zeros((), jnp.float32)
    for fake in d_fake:
        loss += jnp.mean(jax.nn.relu(1.0 - _f32(fake[-1])))
    return loss


def feature_matching_loss(d_fake: FeatureMaps, d_real: FeatureMaps) -> jax.Array:
    """DAC's feature-matching loss: sum over discriminators and layers of E|F(fake) - F(real)|.

    The logits (last entry of each list) are excluded and the real features are held constant,
    as DAC's `GANLoss.generator_loss` does.

    Args:
      d_fake: discriminator outputs on generated audio (feature-map lists, logits last).
      d_real: discriminator outputs on real audio, same structure.

    Returns:
      Scalar float32 loss.
    """
    loss = jnp.zeros((), jnp.float32)
    for fake, real in zip(d_fake, d_real, strict=True):
        for f, r in zip(fake[:-1], real[:-1], strict=True):
            loss += jnp.mean(jnp.abs(_f32(f) - jax.lax.stop_gradient(_f32(r))))
    return loss


def discriminator_loss(d_fake: FeatureMaps, d_real: FeatureMaps,
                       kind: str = "lsgan") -> jax.Array:
    """The discriminator's adversarial loss, `kind` "lsgan" (DAC) or "hinge"."""
    if kind == "lsgan":
        return lsgan_discriminator_loss(d_fake, d_real)
    if kind == "hinge":
        return hinge_discriminator_loss(d_fake, d_real)
    raise ValueError(f"unknown adversarial loss {kind!r}; use 'lsgan' or 'hinge'")


def generator_adversarial_loss(d_fake: FeatureMaps, kind: str = "lsgan") -> jax.Array:
    """The generator's adversarial loss, `kind` "lsgan" (DAC) or "hinge"."""
    if kind == "lsgan":
        return lsgan_generator_loss(d_fake)
    if kind == "hinge":
        return hinge_generator_loss(d_fake)
    raise ValueError(f"unknown adversarial loss {kind!r}; use 'lsgan' or 'hinge'")


def weighted_total(losses: Mapping[str, jax.Array],
                   weights: Mapping[str, float] | None = None) -> jax.Array:
    """Sum of `weights[k] * losses[k]` over the keys present in both (DAC's `lambdas` sum).

    Args:
      losses: named scalar losses, e.g. {"mel/loss": ..., "adv/gen_loss": ...}.
      weights: loss weights keyed the same way; None uses DEFAULT_LOSS_WEIGHTS.

    Returns:
      Scalar float32 total.
    """
    weights = DEFAULT_LOSS_WEIGHTS if weights is None else weights
    total = jnp.zeros((), jnp.float32)
    for name, weight in weights.items():
        if name in losses and weight:
            total += weight * _f32(losses[name])
    return total
