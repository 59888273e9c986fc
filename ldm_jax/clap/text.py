"""Caption tokenizer (SentencePiece, Kudo & Richardson 2018) and the CLAP text tower.

Token layout follows CLIP: `[BOS] pieces... [EOS] [PAD]...`, padded or truncated to a fixed length
so that jitted text encoders see one static shape; the EOS position survives truncation.

The text tower is CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision") with two changes for conditioning: attention is
bidirectional with a key padding mask (as in the RoBERTa tower of LAION-CLAP, Wu et al. 2023), so
every token state sees the whole caption, and its token states are returned for cross-attention.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from ldm_jax import paths
from ldm_jax.nn.attention import Transformer
from ldm_jax.nn.embeddings import LearnedPositionEmbedding
from ldm_jax.nn.layers import dense, embed

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable; the message says what to run."""


class ClapError(ValueError):
    """A CLAP model or its inputs cannot be used as given; the message says what to do."""


class Tokenizer:
    """A loaded SentencePiece model with fixed-length batch encoding."""

    def __init__(self, model_proto: bytes):
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_proto)
        self.model_proto = model_proto

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        if not paths.isfile(path):
            raise TokenizerError(f"no tokenizer at {path}; run `ldm-jax tokenizer train` first")
        proto = paths.read_bytes(path)
        try:
            return cls(proto)
        except RuntimeError as e:
            raise TokenizerError(f"{path} is not a SentencePiece model ({e})") from e

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512,
              model_type: str = "bpe") -> Tokenizer:
        """Trains a model on captions; the vocabulary shrinks if the captions are too few for it.

        BPE is the default because it degrades gracefully on a small caption set: it merges whole
        words before it runs out of merges. A unigram model trained on the 384 captions of the
        tiny chain stops at 233 of 512 pieces and splits even "in" and "at", so half of those
        captions exceed 32 tokens; BPE keeps every one of them within 32.
        """
        texts = [t.strip() for t in texts if t and t.strip()]
        if not texts:
            raise TokenizerError("no captions to train the tokenizer on; the dataset has none")
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
            model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            hard_vocab_limit=False, character_coverage=1.0, num_threads=2,
            minloglevel=2)
        return cls(out.getvalue())

    def save(self, path: str):
        paths.write_bytes(path, self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def encode(self, texts: str | Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Encodes captions to fixed-length token ids.

        Args:
          texts: one caption or a list of them; an empty caption becomes `[BOS, EOS]`.
          max_length: output length L (at least 2); longer captions are cut, keeping EOS last.

        Returns:
          tokens: int32 [B, L] (pad 0); mask: bool [B, L], True at real tokens.
        """
        if max_length < 2:
            raise TokenizerError(f"max_length must be at least 2, got {max_length}")
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        tokens = np.full((len(batch), max_length), PAD_ID, np.int32)
        for i, ids in enumerate(self._sp.EncodeAsIds(list(batch))):
            ids = [BOS_ID] + ids[: max_length - 2] + [EOS_ID]
            tokens[i, : len(ids)] = ids
        mask = tokens != PAD_ID
        return (tokens[0], mask[0]) if single else (tokens, mask)

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens each caption takes with BOS and EOS, before any truncation: int [B]."""
        return np.asarray([len(ids) + 2 for ids in self._sp.EncodeAsIds(list(texts))], np.int64)

    def decode(self, tokens: np.ndarray) -> str | list[str]:
        """Inverse of `encode` up to SentencePiece normalisation; special ids are dropped."""
        tokens = np.asarray(tokens)
        rows = tokens[None] if tokens.ndim == 1 else tokens
        out = [self._sp.DecodeIds([int(t) for t in row if t > EOS_ID]) for row in rows]
        return out[0] if tokens.ndim == 1 else out


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """`x / ||x||` along `axis`, in float32; a zero vector stays zero."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def pool_tokens(states: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """One vector per caption from token states.

    Args:
      states: [B, L, D].
      mask: bool [B, L], True at real tokens (BOS ... EOS, then padding).
      pooling: "eos" takes the last real token, which is EOS in the tokenizer's layout (CLIP);
        "mean" averages the real tokens.

    Returns:
      [B, D].
    """
    mask = jnp.asarray(mask, bool)
    if pooling == "eos":
        last = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
        return jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        weights = mask.astype(states.dtype)[..., None]
        return jnp.sum(states * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    raise ClapError(f"text pooling {pooling!r} is unknown; use 'eos' or 'mean'")


class TextEncoder(nn.Module):
    """Caption tokens -> token states and a normalised joint-space embedding.

    Pooling defaults to the EOS token (CLIP): under bidirectional attention the EOS state is a
    learned summary of the whole caption, and the token states the diffusion model cross-attends
    to are then trained through the same path as the pooled embedding. `pooling="mean"` averages
    the real tokens instead.

    Attributes:
      vocab_size: embedding rows (at least the tokenizer's vocabulary size).
      max_length: longest token sequence (the tokenizer's `max_length`).
      width: model width D.
      num_layers, num_heads, mlp_ratio, dropout_rate, remat: transformer shape.
      attention_impl: "xla" or "cudnn" (`ldm_jax.nn.attention`).
      embed_dim: joint embedding width E.
      pooling: "eos" or "mean".
    """

    vocab_size: int
    max_length: int
    width: int
    num_layers: int
    num_heads: int
    mlp_ratio: float
    embed_dim: int
    pooling: str
    dropout_rate: float
    remat: bool
    dtype: jnp.dtype
    attention_impl: str = "xla"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False
                 ) -> tuple[jax.Array, dict]:
        """Encodes captions.

        Args:
          tokens: int32 [B, L], L <= max_length, pad id 0 (from `Tokenizer.encode`).
          mask: bool [B, L], True at real tokens. Padding never influences real tokens, so the
            outputs at real positions do not depend on L.
          train: enables dropout (needs a `dropout` rng).

        Returns:
          states: [B, L, D] in `dtype`, after the final LayerNorm (zero at padding).
          aux: {"embedding": float32 [B, E] unit-norm, "pooled": [B, D]}.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mask = jnp.asarray(mask, bool)
        x = embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                  name="token_embedding", **kw)(jnp.asarray(tokens, jnp.int32))
        x = LearnedPositionEmbedding(self.max_length, self.width, name="positions", **kw)(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = Transformer(self.num_layers, self.num_heads, self.mlp_ratio, self.dropout_rate,
                        remat=self.remat, attention_impl=self.attention_impl,
                        name="transformer", **kw)(x, mask, train=train)
        x = jnp.where(mask[..., None], x, 0)
        pooled = pool_tokens(x, mask, self.pooling)
        projected = dense(self.embed_dim, ("embed", "joint"), use_bias=False, name="projection",
                          **kw)(pooled)
        return x, {"embedding": l2_normalize(projected), "pooled": pooled}
