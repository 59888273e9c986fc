"""The embedded default experiment: synthetic music, tiny models, CPU.

`ldm-jax demo` runs it; data commands use its `data` and `tokenizer` sections by default.
"""

import ml_collections

from experiments import common


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(clip_seconds=2.0, num_train=512, num_test=64)
    c.tokenizer = common.tokenizer()
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint()
    c.log = common.log()
    return c
