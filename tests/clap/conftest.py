"""Shared by the CLAP tests: the tiny experiment config they train and evaluate."""

import pytest

from ldm_jax import config as config_lib


def make_test_config():
    """`clap_tiny` shrunk to test size: 8 kHz, 0.4 s crops, one-layer towers of width 32."""
    return config_lib.get_config("clap_tiny", [
        "data.sample_rate=8000", "data.crop_seconds=0.4", "tokenizer.vocab_size=96",
        "tokenizer.max_length=16", "model.embed_dim=16", "model.text.width=32",
        "model.text.num_layers=1", "model.text.num_heads=2", "model.audio.width=32",
        "model.audio.num_layers=1", "model.audio.num_heads=2", "model.audio.max_seconds=0.5",
        "model.audio.n_fft=256", "model.audio.hop_length=128", "model.audio.n_mels=16",
        "train.steps=2", "train.batch_size=8", "train.warmup=1", "checkpoint.every_steps=2",
        "log.every_steps=1", "log.progress=false", "eval.batch_size=8"])


@pytest.fixture(scope="session")
def clap_test_config():
    """A function returning a fresh tiny CLAP config (callers may change it)."""
    return make_test_config
