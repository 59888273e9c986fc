"""Caption tokenizer (SentencePiece, Kudo & Richardson 2018) for the CLAP text tower.

Token layout follows CLIP: `[BOS] pieces... [EOS] [PAD]...`, padded or truncated to a fixed length
so that jitted text encoders see one static shape; the EOS position survives truncation.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable; the message says what to run."""


class Tokenizer:
    """A loaded SentencePiece model with fixed-length batch encoding."""

    def __init__(self, model_proto: bytes):
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_proto)
        self.model_proto = model_proto

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        if not os.path.isfile(path):
            raise TokenizerError(f"no tokenizer at {path}; run `ldm-jax tokenizer train` first")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto)
        except RuntimeError as e:
            raise TokenizerError(f"{path} is not a SentencePiece model ({e})") from e

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512,
              model_type: str = "unigram") -> Tokenizer:
        """Trains a model on captions; the vocabulary shrinks if the captions are too few for it."""
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
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, path)

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

    def decode(self, tokens: np.ndarray) -> str | list[str]:
        """Inverse of `encode` up to SentencePiece normalisation; special ids are dropped."""
        tokens = np.asarray(tokens)
        rows = tokens[None] if tokens.ndim == 1 else tokens
        out = [self._sp.DecodeIds([int(t) for t in row if t > EOS_ID]) for row in rows]
        return out[0] if tokens.ndim == 1 else out
