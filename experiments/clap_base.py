"""CLAP at the size of the public LAION-CLAP towers (Wu et al. 2023), for accelerators.

Text tower: RoBERTa-base shape (width 768, 12 layers, 12 heads, 77 tokens). Audio tower: an
AST/HTSAT-base-sized transformer (width 768, 12 layers, 12 heads) over 10-second crops of 48 kHz
audio with LAION-CLAP's front end (64 mel bands, 1024-point window, hop 480, 50 Hz - 14 kHz);
joint space of 512. Parameters (jax.eval_shape of the init): 197,644,801 in all: text tower
110,084,352 (24,576,000 of them the 32000-piece vocabulary), audio tower 87,560,448,
temperature 1.
bfloat16 compute, float32 parameters.

  ldm-jax train clap --config clap_base --workdir W --config.data.source=/path/to/audio
"""

import ml_collections

from experiments import clap_tiny, common


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(name="audio_folder", sample_rate=48000, crop_seconds=10.0,
                         max_seconds=30.0, worker_count=8, worker_buffer_size=4)
    c.tokenizer = common.tokenizer(vocab_size=32000, max_length=77)
    c.model = clap_tiny.model(c, "clap_base")

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100_000
    c.train.batch_size = 512
    c.train.lr = 1e-4
    c.train.warmup = 2000
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0
    c.train.augment = ml_collections.ConfigDict()
    c.train.augment.clause_drop = 0.2
    c.train.augment.paraphrase = 0.0  # real captions carry no generator attributes
    c.train.augment.attribute_drop = 0.5

    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=2000, keep=3)
    c.log = common.log(every_steps=100, audio_every_steps=0)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128
    c.eval.crop_seconds = 10.0
    c.eval.every_steps = 5000
    return c
