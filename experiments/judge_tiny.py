"""The attribute judge on the embedded synthetic music: instrument, pattern and drums.

A small log-mel CNN (`ldm_jax.judge`) trained on 2-second crops of the training clips with their
labels, evaluated on whole test clips; it judges generated clips independently of CLAP.
"""

import ml_collections

from experiments import common


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(clip_seconds=2.0, num_train=1024, num_test=64, crop_seconds=2.0)
    c.model = ml_collections.ConfigDict(dict(
        sample_rate=c.data.get_ref("sample_rate"), n_fft=1024, hop_length=256, n_mels=64,
        widths=(64, 128, 128, 128), groups=8, dropout=0.1))
    c.train = ml_collections.ConfigDict(dict(steps=600, batch_size=32, lr=2e-3, warmup=50,
                                             weight_decay=1e-4, grad_clip=1.0))
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=300)
    c.log = common.log(every_steps=50, audio_every_steps=0)
    c.eval = ml_collections.ConfigDict(dict(every_steps=0, num_examples=64, batch_size=16,
                                            seed=0))
    return c
