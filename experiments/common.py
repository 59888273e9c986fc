"""Config sections shared by every experiment (big_vision's `configs/common.py`).

Section names are fixed across experiments: `data`, `model`, `train`, `loss_weights`, `mesh`,
`checkpoint`, `log`, `eval`.
"""

import ml_collections


def data(**overrides) -> ml_collections.ConfigDict:
    """The dataset, how it is built and how it is read."""
    c = ml_collections.ConfigDict()
    c.name = "synthetic_music"  # or "audio_folder"
    c.data_dir = ""  # where TFDS datasets live; empty means WORKDIR/data
    c.sample_rate = 16000
    c.channels = 1
    # synthetic_music: clip length, split sizes and generator seed.
    c.clip_seconds = 4.0
    c.num_train = 1024
    c.num_test = 128
    c.seed = 0
    # audio_folder: the user's folder, the test share, and the longest clip kept (longer is cut).
    c.source = ""
    c.test_fraction = 0.1
    c.max_seconds = 30.0
    # Reading: random crops of this length, shuffled with this seed, in grain worker processes.
    c.crop_seconds = 1.0
    c.shuffle_seed = 0
    c.worker_count = 0
    c.worker_buffer_size = 2
    c.update(overrides)
    return c


def tokenizer(**overrides) -> ml_collections.ConfigDict:
    """SentencePiece model trained on the captions of the training split."""
    c = ml_collections.ConfigDict()
    c.vocab_size = 512
    c.model_type = "bpe"  # or "unigram"; see `Tokenizer.train` for why BPE by default
    c.max_length = 32  # BOS + caption + EOS; `ldm-jax tokenizer train` reports what is cut
    c.path = ""  # empty means WORKDIR/tokenizer/spm.model
    c.update(overrides)
    return c


def mesh(**overrides) -> ml_collections.ConfigDict:
    """Device mesh: -1 on one axis takes all remaining devices."""
    c = ml_collections.ConfigDict()
    c.data = -1
    c.fsdp = 1
    c.tensor = 1
    c.update(overrides)
    return c


def checkpoint(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 500
    c.keep = 2
    c.resume_from = ""  # an explicit checkpoint directory used when the workdir has none
    c.init_from = ""  # a model-only init (params) used when neither exists
    c.update(overrides)
    return c


def log(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 50
    c.audio_every_steps = 500
    c.progress = True
    c.update(overrides)
    return c
