"""Codec bottlenecks: residual vector quantisation (factorised or EMA) and a KL (VAE) bottleneck.

* Residual VQ is SoundStream's (Zeghidour et al., 2021): each stage quantises what the previous
  stages left, and quantizer dropout trains one model for every number of codebooks.
* `ResidualVQ` is the Descript Audio Codec's factorised variant (Kumar et al., "High-Fidelity Audio
  Compression with Improved RVQGAN", 2023; after Yu et al., "Vector-quantized Image Modeling with
  Improved VQGAN", 2022): codes are looked up in a low-dimensional projection with L2-normalised
  vectors, trained by codebook and commitment losses.
* `EMAResidualVQ` is the EnCodec / VQ-VAE-2 variant (Défossez et al., 2022; Razavi et al., 2019):
  codebooks follow exponential moving averages of their assigned vectors (Laplace-smoothed
  counts), and codes whose average use falls under a threshold restart on random batch vectors.
  Their state lives in the `codebook_stats` collection, updated only when `train=True`.
* `FSQ` is finite scalar quantisation (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made
  Simple", ICLR 2024): each of a few projected dimensions is bounded to `levels[i]` values and
  rounded with a straight-through gradient; the grid is the codebook, so nothing collapses and
  nothing is learned but the projections. Codes are one integer per group of dimensions (the
  product code of its digits).
* `KLBottleneck` is the Gaussian posterior of a VAE (Kingma & Welling, 2014) in the form used by
  stable-audio-tools: a projection to mean and softplus scale, sampled with the `noise` rng in
  training, the mean at evaluation.

All bottlenecks take `[batch, frames, latent_dim]` and return `(z, aux)`; losses are in
`aux["losses"]` under the names the loss weights use.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.conv import WNConv1d
from ldm_jax.nn.layers import named

STATS = "codebook_stats"  # collection holding the EMA codebooks and their counts
HIGHEST = jax.lax.Precision.HIGHEST


class CodecError(ValueError):
    """A codec used in a way it cannot be; the message says what to do instead."""


# ----------------------------------------------------------------------------------------------
# Pure functions.


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` along `axis` (PyTorch's `F.normalize`)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def nearest_codes(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row in squared Euclidean distance.

    Args:
      x: `[..., dim]` vectors.
      codebook: `[codebook_size, dim]`.

    Returns:
      int32 `[...]` codes.
    """
    x = x.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dist = (jnp.sum(jnp.square(x), -1, keepdims=True)
            - 2.0 * jnp.einsum("...d,nd->...n", x, codebook, precision=HIGHEST)
            + jnp.sum(jnp.square(codebook), -1))
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def factorized_codes(latents: jax.Array, codebook: jax.Array) -> jax.Array:
    """DAC's lookup: nearest code between L2-normalised latents and codebook rows.

    Args:
      latents: `[..., codebook_dim]` projected latents.
      codebook: `[codebook_size, codebook_dim]`.

    Returns:
      int32 `[...]` codes.
    """
    return nearest_codes(l2_normalize(latents.astype(jnp.float32)),
                         l2_normalize(codebook.astype(jnp.float32)))


def straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value `q`, gradient of the identity with respect to `x`."""
    return x + jax.lax.stop_gradient(q - x)


def straight_through_exact(x: jax.Array, q: jax.Array) -> jax.Array:
    """`straight_through` whose forward value is exactly `q` (`x + (q - x)` may round off by an
    ulp): residual stages then subtract the very codebook vectors, as EnCodec does at inference,
    so imported codes match bit for bit."""
    return q + (x - jax.lax.stop_gradient(x))


def vq_losses(latents: jax.Array, quantized: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example commitment and codebook losses (VQ-VAE, van den Oord et al., 2017).

    Args:
      latents: `[B, ...]` encoder-side vectors.
      quantized: `[B, ...]` codebook vectors chosen for them.

    Returns:
      `(commitment [B], codebook [B])`: the mean squared error with the codebook side, resp. the
      encoder side, held constant.
    """
    axes = tuple(range(1, latents.ndim))
    commitment = jnp.mean(jnp.square(latents - jax.lax.stop_gradient(quantized)), axis=axes)
    codebook = jnp.mean(jnp.square(quantized - jax.lax.stop_gradient(latents)), axis=axes)
    return commitment, codebook


def quantizer_dropout_counts(rng: jax.Array, batch: int, n_codebooks: int,
                             rate: float) -> jax.Array:
    """Number of active codebooks per example under quantizer dropout.

    Each example, with probability `rate`, uses a uniform number of codebooks in
    `[1, n_codebooks]`; the others use all `n_codebooks`. (DAC drops a fixed `rate` fraction of
    each batch; the expected counts are the same, and a batch of one is handled.)

    Args:
      rng: PRNG key.
      batch: batch size.
      n_codebooks: codebooks available.
      rate: dropout probability.

    Returns:
      int32 `[batch]` counts in `[1, n_codebooks]`.
    """
    drop_key, count_key = jax.random.split(rng)
    drop = jax.random.bernoulli(drop_key, rate, (batch,))
    count = jax.random.randint(count_key, (batch,), 1, n_codebooks + 1)
    return jnp.where(drop, count, n_codebooks).astype(jnp.int32)


def laplace_smoothing(cluster_size: jax.Array, epsilon: float) -> jax.Array:
    """Additive smoothing of code counts that keeps their total: no code divides by zero."""
    total = jnp.sum(cluster_size)
    n = cluster_size.shape[0]
    return (cluster_size + epsilon) / (total + n * epsilon) * total


def ema_update(embed_avg: jax.Array, cluster_size: jax.Array, samples: jax.Array,
               codes: jax.Array, weights: jax.Array, *, decay: float,
               epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One EMA codebook step: each code moves toward the mean of the vectors assigned to it.

    Args:
      embed_avg: `[N, d]` running sums of assigned vectors.
      cluster_size: `[N]` running counts.
      samples: `[M, d]` vectors of this batch.
      codes: int `[M]` their assigned codes.
      weights: `[M]` 1 for vectors that count, 0 for those of dropped-out examples.
      decay: EMA decay.
      epsilon: Laplace smoothing constant.

    Returns:
      `(embed [N, d], embed_avg [N, d], cluster_size [N])`, the new codebook and statistics.
    """
    n = cluster_size.shape[0]
    weights = weights.astype(jnp.float32)
    counts = jax.ops.segment_sum(weights, codes, num_segments=n)
    sums = jax.ops.segment_sum(samples.astype(jnp.float32) * weights[:, None], codes,
                               num_segments=n)
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    embed_avg = decay * embed_avg + (1.0 - decay) * sums
    embed = embed_avg / laplace_smoothing(cluster_size, epsilon)[:, None]
    return embed, embed_avg, cluster_size


def restart_dead_codes(rng: jax.Array, embed: jax.Array, embed_avg: jax.Array,
                       cluster_size: jax.Array, samples: jax.Array, *,
                       threshold: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Moves codes whose average use is under `threshold` onto random batch vectors.

    A restarted code gets `threshold` as its count, so it survives the next step only if it then
    attracts about that many vectors.

    Args:
      rng: PRNG key.
      embed: `[N, d]` codebook.
      embed_avg: `[N, d]` running sums.
      cluster_size: `[N]` running counts.
      samples: `[M, d]` batch vectors to restart on.
      threshold: counts below it mark a code dead.

    Returns:
      `(embed, embed_avg, cluster_size, dead)` with `dead` the bool `[N]` mask of restarted codes.
    """
    dead = cluster_size < threshold
    picks = jax.random.randint(rng, (embed.shape[0],), 0, samples.shape[0])
    fresh = samples[picks].astype(embed.dtype)
    embed = jnp.where(dead[:, None], fresh, embed)
    embed_avg = jnp.where(dead[:, None], fresh * threshold, embed_avg)
    cluster_size = jnp.where(dead, jnp.asarray(threshold, cluster_size.dtype), cluster_size)
    return embed, embed_avg, cluster_size, dead


def gaussian_posterior(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits `[..., 2 * D]` into a mean and a positive standard deviation `softplus(s) + 1e-4`."""
    mean, scale = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jax.nn.softplus(scale) + 1e-4


def kl_divergence(mean: jax.Array, std: jax.Array) -> jax.Array:
    """KL(N(mean, std^2) || N(0, 1)), summed over channels and averaged over batch and frames.

    Args:
      mean: `[B, T, D]`.
      std: `[B, T, D]`, positive.

    Returns:
      Scalar `mean_{b,t} sum_d 0.5 * (mean^2 + std^2 - 2 log std - 1)`.
    """
    var = jnp.square(std)
    kl = 0.5 * (jnp.square(mean) + var - jnp.log(var) - 1.0)
    return jnp.mean(jnp.sum(kl, axis=-1))


def bitrate(n_codebooks: int, codebook_size: int, frame_rate: float) -> float:
    """Bits per second of `n_codebooks` codes of `log2(codebook_size)` bits at `frame_rate` Hz."""
    return n_codebooks * math.log2(codebook_size) * frame_rate


def codebooks_for_bandwidth(bandwidth: float, codebook_size: int, frame_rate: float) -> int:
    """How many codebooks fit in `bandwidth` kbps, as EnCodec counts (at least one).

    EnCodec rounds the frame rate up to an integer and gives each codebook
    `log2(codebook_size) * frame_rate` bits per second: `max(1, floor(1000 * bandwidth / that))`.
    """
    per_codebook = math.log2(codebook_size) * math.ceil(frame_rate)
    return int(max(1, math.floor(bandwidth * 1000 / per_codebook)))


def codebook_usage(codes: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Usage statistics of a batch of codes.

    Args:
      codes: int `[B, T, K]`.
      codebook_size: entries per codebook.

    Returns:
      `{"vq/perplexity": mean over codebooks of exp(entropy of the code histogram),
        "vq/usage": mean over codebooks of the fraction of entries used}`.
    """
    k = codes.shape[-1]
    flat = codes.reshape(-1, k)
    hist = jnp.zeros((k, codebook_size), jnp.float32).at[jnp.arange(k)[None, :], flat].add(1.0)
    p = hist / jnp.sum(hist, axis=-1, keepdims=True)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return {"vq/perplexity": jnp.mean(jnp.exp(entropy)),
            "vq/usage": jnp.mean(jnp.mean((hist > 0).astype(jnp.float32), axis=-1))}


def _active_counts(module: nn.Module, batch: int, n_stages: int, rate: float,
                   train: bool) -> jax.Array:
    """Active codebooks per example: all `n_stages`, or quantizer dropout in training."""
    if not (train and rate > 0.0):
        return jnp.full((batch,), n_stages, jnp.int32)
    if not module.has_rng("quantizer"):
        raise CodecError("quantizer dropout in training needs a 'quantizer' rng: call apply(..., "
                         "rngs={'quantizer': key})")
    return quantizer_dropout_counts(module.make_rng("quantizer"), batch, n_stages, rate)


def _stage_count(n_quantizers: int | None, n_codebooks: int) -> int:
    if n_quantizers is None:
        return n_codebooks
    if not 1 <= int(n_quantizers) <= n_codebooks:
        raise CodecError(f"n_quantizers={n_quantizers} is out of range: this codec has "
                         f"{n_codebooks} codebooks")
    return int(n_quantizers)


# ----------------------------------------------------------------------------------------------
# Factorised residual VQ (DAC).


class FactorizedVQ(nn.Module):
    """One DAC quantizer: project to `codebook_dim`, look up, project back (all `[B, T, C]`)."""

    input_dim: int
    codebook_size: int
    codebook_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        conv = dict(kernel_size=1, dtype=self.dtype, param_dtype=self.param_dtype)
        self.in_proj = WNConv1d(self.codebook_dim, **conv)
        self.out_proj = WNConv1d(self.input_dim, **conv)
        self.codebook = self.param(
            "codebook", named(nn.initializers.normal(1.0), ("codebook_entries", "codebook_dim")),
            (self.codebook_size, self.codebook_dim), self.param_dtype)

    def quantize_latents(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`[B, T, d]` latents -> (raw codebook vectors `[B, T, d]`, int32 codes `[B, T]`)."""
        codes = factorized_codes(latents, self.codebook)
        return self.embed_codes(codes), codes

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        """int `[B, T]` -> raw (unnormalised) codebook vectors `[B, T, d]`."""
        return jnp.take(self.codebook.astype(jnp.float32), codes, axis=0)

    def __call__(self, x: jax.Array):
        """Quantises `[B, T, input_dim]`; returns `(z_q, codes, latents, commitment, codebook)`."""
        latents = self.in_proj(x).astype(jnp.float32)
        quantized, codes = self.quantize_latents(latents)
        commitment, codebook = vq_losses(latents, quantized)
        z_q = self.out_proj(straight_through(latents, quantized)).astype(jnp.float32)
        return z_q, codes, latents, commitment, codebook


class ResidualVQ(nn.Module):
    """DAC's residual VQ of factorised, L2-normalised codebooks with quantizer dropout."""

    input_dim: int
    n_codebooks: int
    codebook_size: int
    codebook_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.vq = [FactorizedVQ(self.input_dim, self.codebook_size, self.codebook_dim,
                                dtype=self.dtype, param_dtype=self.param_dtype)
                   for _ in range(self.n_codebooks)]

    def __call__(self, x: jax.Array, *, n_quantizers: int | None = None, train: bool = False):
        """Quantises with the first `n_quantizers` codebooks (all by default).

        In training with `dropout_rate > 0`, each example uses a random number of the codebooks
        (rng `quantizer`); all codebooks are still evaluated and the rest masked, as DAC does.

        Args:
          x: `[B, T, input_dim]` encoder output.
          n_quantizers: codebooks to use (static).
          train: apply quantizer dropout.

        Returns:
          `(z [B, T, input_dim], aux)` with `codes` int32 `[B, T, K]`, `latents` `[B, T, K * d]`,
          `n_active` int32 `[B]`, `losses` (`vq/commitment_loss`, `vq/codebook_loss`) and `stats`.
        """
        n = _stage_count(n_quantizers, self.n_codebooks)
        active = _active_counts(self, x.shape[0], n, self.dropout_rate, train)
        residual = x.astype(jnp.float32)
        z = jnp.zeros_like(residual)
        commitment = codebook = jnp.zeros((), jnp.float32)
        codes, latents = [], []
        for i in range(n):
            z_q, codes_i, latents_i, commitment_i, codebook_i = self.vq[i](residual)
            mask = (i < active).astype(jnp.float32)
            z = z + z_q * mask[:, None, None]
            residual = residual - z_q
            commitment = commitment + jnp.mean(commitment_i * mask)
            codebook = codebook + jnp.mean(codebook_i * mask)
            codes.append(codes_i)
            latents.append(latents_i)
        codes = jnp.stack(codes, axis=-1)
        aux = {"codes": codes, "latents": jnp.concatenate(latents, axis=-1), "n_active": active,
               "losses": {"vq/commitment_loss": commitment, "vq/codebook_loss": codebook},
               "stats": codebook_usage(codes, self.codebook_size)}
        return z, aux

    def from_codes(self, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Codes int `[B, T, k]` (k <= K) -> `(z [B, T, input_dim], raw vectors [B, T, k * d])`."""
        z, raw = 0.0, []
        for i in range(_stage_count(codes.shape[-1], self.n_codebooks)):
            vectors = self.vq[i].embed_codes(codes[..., i])
            raw.append(vectors)
            z = z + self.vq[i].out_proj(vectors).astype(jnp.float32)
        return z, jnp.concatenate(raw, axis=-1)

    def from_latents(self, latents: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projected latents `[B, T, k * d]` -> `(z, raw vectors [B, T, k * d], codes [B, T, k])`.

        As in DAC, `k` is the number of whole `codebook_dim` slices in the channels.
        """
        k = min(latents.shape[-1] // self.codebook_dim, self.n_codebooks)
        z, raw, codes = 0.0, [], []
        for i in range(k):
            part = latents[..., i * self.codebook_dim:(i + 1) * self.codebook_dim]
            vectors, codes_i = self.vq[i].quantize_latents(part.astype(jnp.float32))
            raw.append(vectors)
            codes.append(codes_i)
            z = z + self.vq[i].out_proj(vectors).astype(jnp.float32)
        return z, jnp.concatenate(raw, axis=-1), jnp.stack(codes, axis=-1)


# ----------------------------------------------------------------------------------------------
# Residual VQ with EMA codebooks (EnCodec / SoundStream).


class EMAVectorQuantizer(nn.Module):
    """One Euclidean VQ stage whose codebook follows EMA statistics in `codebook_stats`.

    Projects to `codebook_dim` (1x1 weight-normalised convs) only when it differs from
    `input_dim`. The counts start at 1 and the sums at the codebook, so with a dead-code
    threshold above 1 the first training step restarts every code on batch vectors: a
    data-dependent initialisation without a separate k-means pass.
    """

    input_dim: int
    codebook_size: int
    codebook_dim: int
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_threshold: float = 2.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.codebook_dim != self.input_dim:
            conv = dict(kernel_size=1, dtype=self.dtype, param_dtype=self.param_dtype)
            self.in_proj = WNConv1d(self.codebook_dim, **conv)
            self.out_proj = WNConv1d(self.input_dim, **conv)
        shape = (self.codebook_size, self.codebook_dim)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=1, out_axis=0)
        entries = ("codebook_entries", "codebook_dim")
        self.embed = self.variable(STATS, "embed", named(
            lambda: init(self.make_rng("params"), shape, jnp.float32), entries))
        self.embed_avg = self.variable(STATS, "embed_avg",
                                       named(lambda: self.embed.value, entries))
        self.cluster_size = self.variable(STATS, "cluster_size", named(
            lambda: jnp.ones((self.codebook_size,), jnp.float32), ("codebook_entries",)))

    @property
    def projected(self) -> bool:
        return self.codebook_dim != self.input_dim

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        """int `[B, T]` -> codebook vectors `[B, T, codebook_dim]`."""
        return jnp.take(self.embed.value, codes, axis=0)

    def output(self, vectors: jax.Array) -> jax.Array:
        """Codebook-space vectors -> `[B, T, input_dim]`."""
        return (self.out_proj(vectors) if self.projected else vectors).astype(jnp.float32)

    def __call__(self, x: jax.Array, weights: jax.Array, train: bool):
        """Quantises `[B, T, input_dim]`; `weights` `[B]` marks examples whose vectors update the
        statistics. Returns `(z_q, codes, latents, commitment [B])`."""
        latents = (self.in_proj(x) if self.projected else x).astype(jnp.float32)
        codes = nearest_codes(latents, self.embed.value)
        quantized = self.embed_codes(codes)
        commitment, _ = vq_losses(latents, quantized)
        z_q = self.output(straight_through_exact(latents, quantized))
        if train and not self.is_initializing():
            self._update(jax.lax.stop_gradient(latents), codes, weights)
        return z_q, codes, latents, commitment

    def _update(self, latents: jax.Array, codes: jax.Array, weights: jax.Array):
        if not self.is_mutable_collection(STATS):
            raise CodecError("training the EMA quantizer updates its codebooks: call apply(..., "
                             f"train=True, mutable=['{STATS}']) and keep the returned state")
        samples = latents.reshape(-1, self.codebook_dim)
        per_vector = jnp.repeat(weights.astype(jnp.float32), latents.shape[1])
        embed, embed_avg, cluster_size = ema_update(
            self.embed_avg.value, self.cluster_size.value, samples, codes.reshape(-1),
            per_vector, decay=self.decay, epsilon=self.epsilon)
        if self.dead_code_threshold > 0:
            if not self.has_rng("quantizer"):
                raise CodecError("dead-code restarts need a 'quantizer' rng: call apply(..., "
                                 "rngs={'quantizer': key})")
            embed, embed_avg, cluster_size, _ = restart_dead_codes(
                self.make_rng("quantizer"), embed, embed_avg, cluster_size, samples,
                threshold=self.dead_code_threshold)
        self.embed.value = embed
        self.embed_avg.value = embed_avg
        self.cluster_size.value = cluster_size


class EMAResidualVQ(nn.Module):
    """Residual VQ of EMA-updated Euclidean codebooks with quantizer dropout and restarts."""

    input_dim: int
    n_codebooks: int
    codebook_size: int
    codebook_dim: int
    dropout_rate: float = 0.0
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_threshold: float = 2.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.vq = [EMAVectorQuantizer(self.input_dim, self.codebook_size, self.codebook_dim,
                                      self.decay, self.epsilon, self.dead_code_threshold,
                                      dtype=self.dtype, param_dtype=self.param_dtype)
                   for _ in range(self.n_codebooks)]

    def __call__(self, x: jax.Array, *, n_quantizers: int | None = None, train: bool = False):
        """Same contract as `ResidualVQ.__call__`; `vq/codebook_loss` is 0 (EMA trains codes).

        With `train=True` the `codebook_stats` collection must be mutable, and the `quantizer` rng
        is needed for dropout and restarts. Only the examples a stage is active for update it.
        """
        n = _stage_count(n_quantizers, self.n_codebooks)
        active = _active_counts(self, x.shape[0], n, self.dropout_rate, train)
        residual = x.astype(jnp.float32)
        z = jnp.zeros_like(residual)
        commitment = jnp.zeros((), jnp.float32)
        codes, latents = [], []
        for i in range(n):
            mask = (i < active).astype(jnp.float32)
            z_q, codes_i, latents_i, commitment_i = self.vq[i](residual, mask, train)
            z = z + z_q * mask[:, None, None]
            residual = residual - z_q
            commitment = commitment + jnp.mean(commitment_i * mask)
            codes.append(codes_i)
            latents.append(latents_i)
        codes = jnp.stack(codes, axis=-1)
        aux = {"codes": codes, "latents": jnp.concatenate(latents, axis=-1), "n_active": active,
               "losses": {"vq/commitment_loss": commitment,
                          "vq/codebook_loss": jnp.zeros((), jnp.float32)},
               "stats": codebook_usage(codes, self.codebook_size)}
        return z, aux

    def from_codes(self, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Codes int `[B, T, k]` -> `(z [B, T, input_dim], codebook vectors [B, T, k * d])`."""
        z, raw = 0.0, []
        for i in range(_stage_count(codes.shape[-1], self.n_codebooks)):
            vectors = self.vq[i].embed_codes(codes[..., i])
            raw.append(vectors)
            z = z + self.vq[i].output(vectors)
        return z, jnp.concatenate(raw, axis=-1)

    def from_latents(self, latents: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projected latents `[B, T, k * d]` -> `(z, codebook vectors, codes [B, T, k])`."""
        k = min(latents.shape[-1] // self.codebook_dim, self.n_codebooks)
        z, raw, codes = 0.0, [], []
        for i in range(k):
            part = latents[..., i * self.codebook_dim:(i + 1) * self.codebook_dim]
            codes_i = nearest_codes(part, self.vq[i].embed.value)
            vectors = self.vq[i].embed_codes(codes_i)
            raw.append(vectors)
            codes.append(codes_i)
            z = z + self.vq[i].output(vectors)
        return z, jnp.concatenate(raw, axis=-1), jnp.stack(codes, axis=-1)


# ----------------------------------------------------------------------------------------------
# Finite scalar quantisation.

FSQ_MAX_CODES = 2 ** 16  # the paper's largest codebook; code histograms stay small


def fsq_bound(z: jax.Array, levels: jax.Array, eps: float = 1e-3) -> jax.Array:
    """The paper's bounding function: `tanh(z + shift) * h - offset` with `h = (L - 1)(1 + ε) / 2`,
    offset 1/2 for even L (so rounding gives L values, -L/2 .. L/2 - 1) and 0 for odd L
    (-(L - 1)/2 .. (L - 1)/2), and `shift = atanh(offset / h)` so that 0 maps to 0."""
    levels = levels.astype(jnp.float32)
    half = (levels - 1.0) * (1.0 + eps) / 2.0
    offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
    return jnp.tanh(z + jnp.arctanh(offset / half)) * half - offset


def fsq_quantize(z: jax.Array, levels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[..., d]` -> (grid values scaled to [-1, 1] with a straight-through gradient,
    int32 digits in [0, levels))."""
    bounded = fsq_bound(z, levels)
    rounded = jnp.round(bounded)
    half_width = (levels // 2).astype(jnp.float32)
    return (straight_through(bounded, rounded) / half_width,
            (rounded + half_width).astype(jnp.int32))


def _fsq_basis(levels: jax.Array) -> jax.Array:
    """The place value of each digit in a product code: `prod(levels[:i])`."""
    return jnp.cumprod(jnp.concatenate([jnp.ones((1,), jnp.int32), levels[:-1]]))


def fsq_pack(digits: jax.Array, levels: jax.Array) -> jax.Array:
    """int digits `[..., d]` -> product codes `[...]`: `sum_i digits_i * prod(levels[:i])`."""
    return jnp.sum(digits * _fsq_basis(levels), axis=-1).astype(jnp.int32)


def fsq_unpack(codes: jax.Array, levels: jax.Array) -> jax.Array:
    """Product codes `[...]` -> grid values `[..., d]` in [-1, 1] (`fsq_pack`'s inverse)."""
    digits = (codes[..., None] // _fsq_basis(levels)) % levels
    half_width = (levels // 2).astype(jnp.float32)
    return (digits.astype(jnp.float32) - half_width) / half_width


class FSQ(nn.Module):
    """Finite scalar quantisation of `groups` groups of `len(levels)` projected dimensions.

    A 1x1 convolution projects the encoder output to `groups * len(levels)` dimensions, each
    group is quantised on the grid of `levels` and coded as one integer in
    `[0, prod(levels))`, and another 1x1 convolution projects back. No losses, no state.
    """

    input_dim: int
    levels: tuple[int, ...]
    groups: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        conv = dict(kernel_size=1, dtype=self.dtype, param_dtype=self.param_dtype)
        self.in_proj = WNConv1d(self.groups * len(self.levels), **conv)
        self.out_proj = WNConv1d(self.input_dim, **conv)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _levels(self) -> jax.Array:
        return jnp.asarray(self.levels, jnp.int32)

    def _check_groups(self, k: int | None, what: str):
        if k is not None and int(k) != self.groups:
            raise CodecError(f"{what}={k}: an FSQ codec's {self.groups} code groups are not "
                             "ordered like residual codebooks; use all of them")

    def __call__(self, x: jax.Array, *, n_quantizers: int | None = None, train: bool = False):
        """Returns `(z [B, T, input_dim], aux)` with `codes` int32 `[B, T, groups]`, `latents`
        (the projected, unbounded dimensions), `n_active`, empty `losses` and `stats`."""
        self._check_groups(n_quantizers, "n_quantizers")
        latents = self.in_proj(x).astype(jnp.float32)
        b, t, _ = latents.shape
        values, digits = fsq_quantize(latents.reshape(b, t, self.groups, -1), self._levels())
        codes = fsq_pack(digits, self._levels())
        z = self.out_proj(values.reshape(b, t, -1)).astype(jnp.float32)
        aux = {"codes": codes, "latents": latents,
               "n_active": jnp.full((b,), self.groups, jnp.int32), "losses": {},
               "stats": codebook_usage(codes, self.codebook_size)}
        return z, aux

    def from_codes(self, codes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Codes int `[B, T, groups]` -> `(z [B, T, input_dim], grid values [B, T, groups * d])`."""
        self._check_groups(codes.shape[-1], "codes for")
        values = fsq_unpack(codes, self._levels())
        values = values.reshape(codes.shape[:2] + (-1,))
        return self.out_proj(values).astype(jnp.float32), values


# ----------------------------------------------------------------------------------------------
# KL bottleneck (VAE).


class KLBottleneck(nn.Module):
    """Gaussian posterior over `[B, T, input_dim]` latents with a KL penalty to N(0, I)."""

    input_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.proj = WNConv1d(2 * self.input_dim, kernel_size=1, dtype=self.dtype,
                             param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array, *, n_quantizers: int | None = None, train: bool = False):
        """Samples `z = mean + std * eps` (rng `noise`) in training, `z = mean` otherwise.

        Returns:
          `(z [B, T, input_dim], aux)` with `latents` (= z), `mean`, `std` and
          `losses["kl/loss"]` (see `kl_divergence`).
        """
        if n_quantizers is not None:
            raise CodecError("n_quantizers applies to quantised codecs; this one has the 'kl' "
                             "bottleneck")
        mean, std = gaussian_posterior(self.proj(x))
        if train:
            if not self.has_rng("noise"):
                raise CodecError("the KL bottleneck samples in training: call apply(..., "
                                 "rngs={'noise': key})")
            z = mean + std * jax.random.normal(self.make_rng("noise"), mean.shape, mean.dtype)
        else:
            z = mean
        aux = {"latents": z, "mean": mean, "std": std,
               "losses": {"kl/loss": kl_divergence(mean, std)}}
        return z, aux
