"""The embedded default experiment: synthetic music, tiny models, CPU.

`ldm-jax demo` runs this chain into ./runs/demo; data and tokenizer commands use its `data` and
`tokenizer` sections by default. Each stage embeds its own experiment's config (one source of
truth for a model's shape) and reads the dataset that the top-level `data` section builds.
"""

import ml_collections

from experiments import clap_tiny, codec_tiny, common

# What the dataset is built with; stages may only change how they read it (crops, workers).
BUILD_KEYS = ("name", "data_dir", "sample_rate", "channels", "clip_seconds", "num_train",
              "num_test", "seed", "source", "test_fraction", "max_seconds")


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(clip_seconds=2.0, num_train=384, num_test=64)
    c.tokenizer = common.tokenizer()
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint()
    c.log = common.log()
    c.codec = codec_tiny.get_config()
    c.codec.train.steps = 600
    c.codec.train.disc_start = 300
    c.codec.checkpoint.every_steps = 200
    c.codec.eval.num_examples = 32
    c.clap = clap_tiny.get_config()
    for key in c.tokenizer:
        c.clap.tokenizer[key] = c.tokenizer.get_ref(key)
    share_data(c)
    return c


def share_data(c):
    """Points every stage's data section at the chain's build parameters."""
    for stage in ("codec", "clap", "ldm"):
        if stage in c:
            for key in BUILD_KEYS:
                # A reference, so `--config.data.KEY=...` reaches every stage.
                c[stage].data[key] = c.data.get_ref(key)
            c[stage].mesh = c.mesh
