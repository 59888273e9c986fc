"""SentencePiece caption tokenizer: train, save/load, fixed-length encode, decode."""

import numpy as np
import pytest

from ldm_jax.clap.text import BOS_ID, EOS_ID, PAD_ID, Tokenizer, TokenizerError

CAPTIONS = [f"a {tempo} {inst} {pat} in {key} {mode}"
            for tempo in ("slow", "fast", "moderate") for inst in ("organ", "bell", "bass")
            for pat in ("melody", "arpeggio") for key in ("A", "C#", "F") for mode in ("major",
                                                                                   "minor")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CAPTIONS, vocab_size=64)


def test_encode_pads_and_round_trips(tok, tmp_path):
    path = str(tmp_path / "spm.model")
    tok.save(path)
    tok2 = Tokenizer.load(path)
    tokens, mask = tok2.encode(["a slow organ melody in A minor", "fast bell"], max_length=48)
    assert tokens.shape == (2, 48) and tokens.dtype == np.int32
    assert tokens[:, 0].tolist() == [BOS_ID, BOS_ID]
    assert mask[0].sum() > mask[1].sum() > 2 and (tokens[~mask] == PAD_ID).all()
    assert tokens[1, mask[1].sum() - 1] == EOS_ID
    assert tok2.decode(tokens[0]) == "a slow organ melody in A minor"


def test_truncation_keeps_eos_and_empty_caption(tok):
    tokens, mask = tok.encode(" ".join(CAPTIONS[:20]), max_length=8)
    assert mask.all() and tokens[-1] == EOS_ID and tokens[0] == BOS_ID
    tokens, mask = tok.encode("", max_length=8)
    assert tokens[:2].tolist() == [BOS_ID, EOS_ID] and mask.sum() == 2


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="run `ldm-jax tokenizer train`"):
        Tokenizer.load(str(tmp_path / "missing.model"))
    with pytest.raises(TokenizerError, match="no captions"):
        Tokenizer.train(["", "  "])


def test_lengths_count_bos_and_eos_before_truncation(tok):
    captions = ["a slow organ melody in A minor", "fast bell", " ".join(CAPTIONS[:20])]
    lengths = tok.lengths(captions)
    _, mask = tok.encode(captions, max_length=256)
    assert lengths.tolist() == mask.sum(axis=1).tolist() and lengths[2] > 64


def test_bpe_keeps_synthetic_captions_whole():
    """On a caption set the size of the tiny chain's, BPE learns whole words (unigram does not)."""
    from ldm_jax.data import synthetic
    captions = [synthetic.generate_example(0, i, "train", sample_rate=8000,
                                           seconds=0.01)["caption"] for i in range(384)]
    bpe = Tokenizer.train(captions, vocab_size=512, model_type="bpe")
    unigram = Tokenizer.train(captions, vocab_size=512, model_type="unigram")
    lengths = bpe.lengths(captions)
    assert lengths.max() <= 32
    assert np.median(lengths) < np.median(unigram.lengths(captions))
