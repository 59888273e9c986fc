"""CLAP: contrastive language-audio pretraining (Elizalde et al. 2023; LAION-CLAP, Wu et al. 2023).

A text tower and an audio tower map captions and clips into one L2-normalised space; training
pulls each clip towards its caption with CLIP's symmetric InfoNCE loss (Radford et al. 2021;
van den Oord et al. 2018) at a learned temperature. Under `jax.jit` with batch-sharded inputs the
similarity matrix `audio @ text.T` is formed over the global batch by GSPMD, so every example is
contrasted with every other example of the step, on any number of devices (no explicit gather).

Entry points: `make_model(cfg)`, the pure functions `embed_text`, `embed_audio`, `text_states`,
`contrastive_loss`, and `ClapModel.load(workdir)` for use from Python and by the diffusion stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ldm_jax import checkpoint, parallel, paths
from ldm_jax.clap.audio import AudioEncoder
from ldm_jax.clap.text import ClapError, TextEncoder, Tokenizer
from ldm_jax.config import Section
from ldm_jax.nn.attention import ATTENTION_IMPLS, check_attention_impl
from ldm_jax.nn.layers import named

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
POOLINGS = ("eos", "mean")


def _check_tower(name: str, tower, sizes: tuple[int, ...]):
    """A tower's sizes are positive and its width splits into its heads."""
    if min(*sizes, tower.width, tower.num_layers, tower.num_heads) < 1 or \
            tower.width % tower.num_heads:
        raise ClapError(f"model.{name} sizes must be positive and width a multiple of "
                        "num_heads")


@dataclasses.dataclass(frozen=True)
class TextConfig(Section):
    """The text tower (`model.text`). `vocab_size` and `max_length` follow the tokenizer."""

    LABEL: ClassVar[str] = "CLAP text config"
    ERROR: ClassVar[type[Exception]] = ClapError

    vocab_size: int = 512
    max_length: int = 32
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pooling: str = "eos"  # or "mean"
    dropout_rate: float = 0.0

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ClapError(f"model.text.pooling={self.pooling!r}: use 'eos' or 'mean'")
        _check_tower("text", self, (self.vocab_size, self.max_length))


@dataclasses.dataclass(frozen=True)
class AudioConfig(Section):
    """The audio tower and its log-mel front end (`model.audio`)."""

    LABEL: ClassVar[str] = "CLAP audio config"
    ERROR: ClassVar[type[Exception]] = ClapError

    sample_rate: int = 16000
    max_seconds: float = 4.0
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None
    mel_offset: float = -3.0
    mel_scale: float = 2.0
    stem_strides: tuple[int, ...] = (2, 2)
    width: int = 128
    num_layers: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0

    def __post_init__(self):
        _check_tower("audio", self, (self.sample_rate, self.n_fft, self.hop_length,
                                     self.n_mels))
        if self.max_seconds <= 0:
            raise ClapError(f"model.audio.max_seconds={self.max_seconds} must be positive")


@dataclasses.dataclass(frozen=True)
class ClapConfig(Section):
    """The `model` section of a CLAP experiment (defaults: the `clap_tiny` towers)."""

    LABEL: ClassVar[str] = "CLAP config"
    ERROR: ClassVar[type[Exception]] = ClapError

    embed_dim: int = 128
    dtype: str = "float32"  # compute dtype; parameters are float32
    remat: bool = False
    attention_impl: str = "xla"  # or "cudnn" (NVIDIA GPUs, bfloat16/float16): nn.attention
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    text: TextConfig = TextConfig()
    audio: AudioConfig = AudioConfig()

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ClapError(f"model.dtype={self.dtype!r} is unknown; use one of "
                            f"{', '.join(DTYPES)}")
        if self.embed_dim < 1:
            raise ClapError(f"model.embed_dim={self.embed_dim} must be positive")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ClapError(f"model.attention_impl={self.attention_impl!r} is unknown; use one "
                            f"of {', '.join(ATTENTION_IMPLS)}")


# The towers of the embedded experiments: `clap_tiny` (the defaults) and `clap_base`, the size of
# the public LAION-CLAP towers (RoBERTa-base text, an HTSAT-base-sized audio transformer).
PRESETS: dict[str, ClapConfig] = {
    "clap_tiny": ClapConfig(),
    "clap_base": ClapConfig(
        embed_dim=512, dtype="bfloat16",
        text=TextConfig(vocab_size=32000, max_length=77, width=768, num_layers=12,
                        num_heads=12),
        audio=AudioConfig(sample_rate=48000, max_seconds=10.0, n_fft=1024, hop_length=480,
                          n_mels=64, fmin=50.0, fmax=14000.0, width=768, num_layers=12,
                          num_heads=12)),
}


def config_of(cfg) -> ClapConfig:
    """The `ClapConfig` of an experiment config, its `model` section, or a `ClapConfig`."""
    if isinstance(cfg, ClapConfig):
        return cfg
    return ClapConfig.from_dict(cfg["model"] if "model" in cfg else cfg)

__all__ = ["PRESETS", "AudioConfig", "Clap", "ClapConfig", "ClapError", "ClapModel", "TextConfig",
           "clap_dir", "contrastive_loss", "embed_audio", "embed_text", "init_params",
           "init_variables", "load", "make_embedders", "make_model", "similarity_logits",
           "text_states"]


class Clap(nn.Module):
    """The two towers and the learned temperature (`logit_scale`, a log inverse temperature).

    Attributes:
      text: the text tower.
      audio: the audio tower.
      logit_scale_init: initial log inverse temperature (CLIP: log(1 / 0.07)).
      logit_scale_max: the inverse temperature is clamped to `exp(logit_scale_max)` (CLIP: 100).
    """

    text: TextEncoder
    audio: AudioEncoder
    logit_scale_init: float
    logit_scale_max: float

    def setup(self):
        self.logit_scale = self.param("logit_scale", named(nn.initializers.constant(
            self.logit_scale_init), ()), (), jnp.float32)

    def encode_text(self, tokens, mask, *, train: bool = False):
        """`TextEncoder.__call__`: (states [B, L, D], {"embedding", "pooled"})."""
        return self.text(tokens, mask, train=train)

    def encode_audio(self, wave, wave_mask=None, *, train: bool = False):
        """`AudioEncoder.__call__`: (states [B, N, D], {"embedding", "mask", "pooled"})."""
        return self.audio(wave, wave_mask, train=train)

    def __call__(self, tokens, text_mask, wave, wave_mask=None, *, train: bool = False
                 ) -> tuple[jax.Array, dict]:
        """Audio-to-text logits of a batch of (clip, caption) pairs.

        Args:
          tokens, text_mask: int32 / bool [B, L] captions.
          wave, wave_mask: float [B, T] / bool [B, T] clips.
          train: enables dropout.

        Returns:
          logits: float32 [B, B], `scale * audio_embedding @ text_embedding.T`.
          aux: {"audio_embedding": [B, E], "text_embedding": [B, E], "logit_scale": scalar
                (the clamped log inverse temperature)}.
        """
        _, text_aux = self.encode_text(tokens, text_mask, train=train)
        _, audio_aux = self.encode_audio(wave, wave_mask, train=train)
        scale = jnp.minimum(self.logit_scale, self.logit_scale_max)
        logits = similarity_logits(audio_aux["embedding"], text_aux["embedding"], scale)
        return logits, {"audio_embedding": audio_aux["embedding"],
                        "text_embedding": text_aux["embedding"], "logit_scale": scale}


def similarity_logits(audio_embedding: jax.Array, text_embedding: jax.Array,
                      logit_scale: jax.Array) -> jax.Array:
    """`exp(logit_scale) * audio @ text.T` in float32 ([B, E] x [B, E] -> [B, B])."""
    sim = jnp.matmul(audio_embedding.astype(jnp.float32), text_embedding.astype(jnp.float32).T,
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.exp(logit_scale) * sim


def contrastive_loss(logits: jax.Array) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE over a [B, B] logit matrix whose diagonal holds the true pairs.

    Args:
      logits: float [B, B], row i = clip i against every caption of the (global) batch.

    Returns:
      loss: scalar, the mean of the audio->text and text->audio cross-entropies.
      metrics: {"loss/audio_to_text", "loss/text_to_audio", "accuracy/audio_to_text",
                "accuracy/text_to_audio"} (in-batch top-1).
    """
    logits = logits.astype(jnp.float32)
    labels = jnp.arange(logits.shape[0])
    a2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    t2a = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    metrics = {"loss/audio_to_text": a2t, "loss/text_to_audio": t2a,
               "accuracy/audio_to_text": jnp.mean(jnp.argmax(logits, axis=1) == labels),
               "accuracy/text_to_audio": jnp.mean(jnp.argmax(logits, axis=0) == labels)}
    return 0.5 * (a2t + t2a), metrics


def make_model(cfg) -> Clap:
    """Builds the Clap module.

    Args:
      cfg: a `ClapConfig`, or an experiment config / its `model` section (ConfigDict or dict of
        `ClapConfig`'s fields; missing fields take their defaults).

    Returns:
      An unbound Clap module.
    """
    m = config_of(cfg)
    dtype = DTYPES[m.dtype]
    check_attention_impl(m.attention_impl, dtype)
    t, a = m.text, m.audio
    text = TextEncoder(
        vocab_size=t.vocab_size, max_length=t.max_length, width=t.width,
        num_layers=t.num_layers, num_heads=t.num_heads, mlp_ratio=t.mlp_ratio,
        embed_dim=m.embed_dim, pooling=t.pooling, dropout_rate=t.dropout_rate, remat=m.remat,
        dtype=dtype, attention_impl=m.attention_impl)
    audio = AudioEncoder(
        sample_rate=a.sample_rate, max_seconds=a.max_seconds, n_fft=a.n_fft,
        hop_length=a.hop_length, n_mels=a.n_mels, fmin=a.fmin, fmax=a.fmax,
        mel_offset=a.mel_offset, mel_scale=a.mel_scale, stem_strides=a.stem_strides,
        width=a.width, num_layers=a.num_layers, num_heads=a.num_heads, mlp_ratio=a.mlp_ratio,
        embed_dim=m.embed_dim, dropout_rate=a.dropout_rate, remat=m.remat, dtype=dtype,
        attention_impl=m.attention_impl)
    return Clap(text=text, audio=audio, logit_scale_init=m.logit_scale_init,
                logit_scale_max=m.logit_scale_max)


def init_variables(model: Clap, rng: jax.Array, text_length: int | None = None,
                   audio_samples: int | None = None, *, boxed: bool = False) -> dict:
    """Fresh variables `{"params": {"text": ..., "audio": ..., "logit_scale": ...}}`.

    Shapes depend only on the model; the dummy inputs default to the longest caption and at most
    one second of audio. With `boxed`, each array stays in the `nn.LogicallyPartitioned` box that
    names its axes (what `ldm_jax.parallel.tree_shardings` reads); otherwise plain arrays.
    """
    a = model.audio
    length = text_length or model.text.max_length
    longest = max(int(a.max_seconds * a.sample_rate), a.n_fft)
    samples = audio_samples or min(a.sample_rate, longest)
    tokens = jnp.zeros((1, length), jnp.int32)
    wave = jnp.zeros((1, samples), jnp.float32)
    variables = model.init(rng, tokens, tokens > 0, wave, None)
    return variables if boxed else nn.meta.unbox(variables)


def init_params(cfg, rng: jax.Array, text_length: int | None = None,
                audio_samples: int | None = None, *, boxed: bool = False) -> dict:
    """`init_variables(make_model(cfg), ...)["params"]`."""
    return init_variables(make_model(cfg), rng, text_length, audio_samples,
                          boxed=boxed)["params"]


def _check_tokens(tokens, cfg):
    limit = config_of(cfg).text.max_length
    if tokens.shape[-1] > limit:
        raise ClapError(f"captions of {tokens.shape[-1]} tokens exceed model.text.max_length="
                        f"{limit}; encode them with max_length={limit}")


def embed_text(params, tokens, mask, cfg) -> jax.Array:
    """Unit-norm caption embeddings.

    Args:
      params: the model parameters (`state["params"]`).
      tokens: int32 [B, L]; mask: bool [B, L] (from `Tokenizer.encode`).
      cfg: the experiment config or its `model` section (static).

    Returns:
      float32 [B, E].
    """
    _check_tokens(tokens, cfg)
    _, aux = make_model(cfg).apply({"params": params}, tokens, mask,
                                   method=Clap.encode_text)
    return aux["embedding"]


def text_states(params, tokens, mask, cfg) -> jax.Array:
    """Token states [B, L, D] of the text tower (zero at padding), for cross-attention."""
    _check_tokens(tokens, cfg)
    states, _ = make_model(cfg).apply({"params": params}, tokens, mask,
                                      method=Clap.encode_text)
    return states


def embed_audio(params, wave, mask, cfg) -> jax.Array:
    """Unit-norm clip embeddings.

    Args:
      params: the model parameters.
      wave: float [B, T] at model.audio.sample_rate; mask: bool [B, T] real samples (or None).
      cfg: the experiment config or its `model` section (static).

    Returns:
      float32 [B, E], independent of how much padding follows each clip.
    """
    _, aux = make_model(cfg).apply({"params": params}, wave, mask, method=Clap.encode_audio)
    return aux["embedding"]


def text_layer_index(cfg, layer: int) -> int:
    """`layer` of the text tower as an index into (embeddings, block_0, ..., final states).

    0 is the token and position embeddings, k the output of transformer block k - 1, and
    `num_layers` (or -1) the tower's final states; negative values count from the end, as
    "clip skip" does (-2 is the penultimate block).
    """
    n = config_of(cfg).text.num_layers
    index = layer + n + 1 if layer < 0 else layer
    if not 0 <= index <= n:
        raise ClapError(f"text layer {layer} is outside the text tower's {n} blocks; use "
                        f"0..{n} or -{n + 1}..-1")
    return index


def make_text_embedder(cfg, layer: int = -1):
    """Jitted `(params, tokens, mask) -> (states [B, L, D], embedding [B, E])`, the states taken
    from text `layer` (see `text_layer_index`).

    The final layer's states are the tower's output (after its last LayerNorm). An earlier
    layer's are standardised per token without parameters (zero mean, unit variance over D), so
    every layer reaches a consumer at the same scale; padding stays zero.
    """
    model = make_model(cfg)
    n = config_of(cfg).text.num_layers
    index = text_layer_index(cfg, layer)
    target = "positions" if index == 0 else f"block_{index - 1}"

    def final(p, tokens, mask):
        states, aux = model.apply({"params": p}, tokens, mask, method=Clap.encode_text)
        return states, aux["embedding"]

    def hidden(p, tokens, mask):
        (_, aux), captured = model.apply(
            {"params": p}, tokens, mask, method=Clap.encode_text,
            capture_intermediates=lambda module, _: module.name == target,
            mutable=["intermediates"])
        found = [v for path, v in traverse_util.flatten_dict(captured).items()
                 if path[-2] == target]
        h = jnp.asarray(found[0][0], jnp.float32)
        h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)
        return jnp.where(jnp.asarray(mask, bool)[..., None], h, 0.0), aux["embedding"]

    return jax.jit(final if index == n else hidden)


def make_embedders(cfg) -> tuple:
    """Jitted `(params, tokens, mask) -> (states [B, L, D], embedding [B, E])` and
    `(params, wave, mask) -> embedding [B, E]`, compiled once per input shape."""
    model = make_model(cfg)

    def audio_fn(p, wave, mask):
        return model.apply({"params": p}, wave, mask, method=Clap.encode_audio)[1]["embedding"]

    return make_text_embedder(cfg), jax.jit(audio_fn)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class ClapModel:
    """A trained CLAP model with its tokenizer, for embedding captions and clips from Python.

    Inputs are padded to fixed batch and bucketed lengths, so repeated calls reuse compiled code.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, params, tokenizer: Tokenizer,
                 batch_size: int = 64, step: int | None = None):
        self.cfg = cfg
        self.step = step
        self.params = params
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(cfg.model.text.max_length)
        self.sample_rate = int(cfg.model.audio.sample_rate)
        if tokenizer.vocab_size > int(cfg.model.text.vocab_size):
            raise ClapError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model "
                            f"embeds {cfg.model.text.vocab_size}; use the run's own tokenizer")
        self.embedders = make_embedders(cfg)
        self._text, self._audio = self.embedders
        self._layers = {text_layer_index(cfg, -1): self._text}

    def text_embedder(self, layer: int = -1):
        """`make_text_embedder(cfg, layer)`, built once per layer."""
        index = text_layer_index(self.cfg, layer)
        if index not in self._layers:
            self._layers[index] = make_text_embedder(self.cfg, layer)
        return self._layers[index]

    @classmethod
    def load(cls, workdir: str, step: int | None = None, batch_size: int = 64) -> ClapModel:
        """Loads `workdir/config.json`, `workdir/tokenizer.model` and the latest checkpoint (read
        on this host alone: any subset of hosts may load it), or a model file from
        `ldm-jax export` (`.msgpack`).

        Raises:
          ClapError: the directory holds no trained CLAP model.
        """
        if workdir.endswith(".msgpack"):  # a model file from `ldm-jax export`
            exported = checkpoint.read_export(workdir, "clap")
            return cls(ml_collections.ConfigDict(exported["config"]),
                       exported["variables"]["params"],
                       Tokenizer(bytes(exported["files"][TOKENIZER_FILE])),
                       batch_size=batch_size, step=exported["provenance"].get("step"))
        path = os.path.join(workdir, CONFIG_FILE)
        if not paths.isfile(path):
            raise ClapError(f"no CLAP model in {workdir} (missing {CONFIG_FILE}); run "
                            "`ldm-jax train clap` first")
        cfg = ml_collections.ConfigDict(json.loads(paths.read_text(path)))
        tokenizer = Tokenizer.load(os.path.join(workdir, TOKENIZER_FILE))
        try:
            params, step, _ = checkpoint.read_params(workdir, step=step)
        except checkpoint.CheckpointError:
            raise ClapError(f"no checkpoint in {workdir}/checkpoints; train the model "
                            "first") from None
        return cls(cfg, params, tokenizer, batch_size=batch_size, step=step)

    def encode_text(self, texts: str | Sequence[str], layer: int = -1):
        """Captions -> (token states float32 [B, L, D] of text `layer`, mask bool [B, L],
        unit-norm embeddings float32 [B, E]).

        The one batching path for captions: chunks of `batch_size`, each padded to a
        power-of-two number of rows (`parallel.bucket_rows`) so that few shapes compile.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens, mask = self.tokenizer.encode(texts, self.max_length)
        text_fn = self.text_embedder(layer)
        states, embs = [], []
        for s, e in _batches(len(texts), self.batch_size):
            pad = parallel.bucket_rows(e - s, self.batch_size) - (e - s)
            t = np.pad(tokens[s:e], [(0, pad), (0, 0)])
            m = np.pad(mask[s:e], [(0, pad), (0, 0)])
            st, em = text_fn(self.params, t, m)
            states.append(np.asarray(st, np.float32)[: e - s])
            embs.append(np.asarray(em, np.float32)[: e - s])
        return np.concatenate(states), mask, np.concatenate(embs)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> float32 [B, E] unit-norm embeddings."""
        return self.encode_text(texts)[2]

    def text_states(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (token states float32 [B, L, D], mask bool [B, L]) for conditioning."""
        states, mask, _ = self.encode_text(texts)
        return states, mask

    def embed_audio(self, audio, mask: np.ndarray | None = None,
                    sample_rate: int | None = None) -> np.ndarray:
        """Clips -> float32 [B, E] unit-norm embeddings.

        Args:
          audio: one clip [T], a batch [B, T] (or [B, T, C]), or a list of clips of any lengths.
          mask: bool [B, T] real samples for a padded batch (None: all real).
          sample_rate: the rate of `audio`; resampled to the model's rate when it differs.
            Clips longer than model.audio.max_seconds are cut to their centre.

        Returns:
          float32 [B, E].
        """
        from ldm_jax.audio.dsp import resample_numpy

        if isinstance(audio, np.ndarray | jax.Array) and np.ndim(audio) == 1:
            audio = [np.asarray(audio)]
        if isinstance(audio, np.ndarray | jax.Array):
            audio = np.asarray(audio, np.float32)
            audio = audio.mean(-1) if audio.ndim == 3 else audio
            lengths = np.full(len(audio), audio.shape[1]) if mask is None else \
                np.asarray(mask).sum(1)
            clips = [a[:n] for a, n in zip(audio, lengths)]
        else:
            clips = [np.asarray(a, np.float32) for a in audio]
            clips = [c.mean(-1) if c.ndim == 2 else c for c in clips]
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            clips = [resample_numpy(c, int(sample_rate), self.sample_rate) for c in clips]
        limit = int(float(self.cfg.model.audio.max_seconds) * self.sample_rate)
        clips = [c[(len(c) - limit) // 2:][:limit] if len(c) > limit else c for c in clips]
        # Lengths are bucketed to tenths of the maximum so few shapes are compiled.
        bucket = max(limit // 10, int(self.cfg.model.audio.n_fft))
        out = []
        for s, e in _batches(len(clips), self.batch_size):
            chunk = clips[s:e]
            width = min(-(-max(len(c) for c in chunk) // bucket) * bucket, max(limit, bucket))
            wave = np.zeros((self.batch_size, width), np.float32)
            valid = np.zeros((self.batch_size, width), bool)
            for i, c in enumerate(chunk):
                wave[i, :len(c)] = c
                valid[i, :len(c)] = True
            out.append(np.asarray(self._audio(self.params, wave, valid))[: e - s])
        return np.concatenate(out)


def clap_dir(path: str) -> str:
    """PATH itself when it is a trained CLAP directory, else PATH/clap (a workdir W)."""
    for candidate in (path, os.path.join(path, "clap")):
        if paths.isfile(os.path.join(candidate, CONFIG_FILE)) and \
                paths.isdir(os.path.join(candidate, "checkpoints")):
            return candidate
    raise ClapError(f"no trained CLAP model in {path}; run `ldm-jax train clap --workdir W` "
                    f"first, or give one of the presets {', '.join(sorted(PRESETS))}")


def load(source: str, *, rng: jax.Array | None = None) -> tuple[Clap, dict]:
    """The CLAP module and its variables, from a trained directory or a preset.

    Args:
      source: a trained CLAP directory (W/clap) or a workdir W holding one, a model file from
        `ldm-jax export` (`.msgpack`), or a name in `PRESETS` (freshly initialised).
      rng: PRNG key for a preset's initialisation (default `PRNGKey(0)`).

    Returns:
      `(clap, {"params": ...})`. For captions and clips with the run's tokenizer use
      `ClapModel.load(clap_dir(source))`.
    """
    if source in PRESETS:
        model = make_model(PRESETS[source])
        return model, init_variables(model, jax.random.PRNGKey(0) if rng is None else rng)
    if source.endswith(".msgpack"):
        exported = checkpoint.read_export(source, "clap")
        return make_model(exported["config"]), exported["variables"]
    directory = clap_dir(source)
    cfg = json.loads(paths.read_text(os.path.join(directory, CONFIG_FILE)))
    params, _, _ = checkpoint.read_params(directory)
    return make_model(cfg), {"params": params}
