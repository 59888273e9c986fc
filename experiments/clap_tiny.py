"""CLAP on synthetic music at CPU smoke size (big_vision's `runlocal` role).

Two narrow towers (width 128; text 2 layers, audio 3 layers over 2-second crops) trained for a few
minutes on the default `synthetic_music` build (1024 training clips of 4 s). Captions are
augmented by attribute dropout and template paraphrase so that short zero-shot prompts ("a piece
played on an organ") are in distribution.

  ldm-jax data build synthetic_music --workdir W
  ldm-jax tokenizer train --workdir W
  ldm-jax train clap --config clap_tiny --workdir W
"""

import ml_collections

from experiments import common
from ldm_jax.clap.model import PRESETS


def model(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """The `model` section: a preset of `ldm_jax.clap.model.PRESETS`, with the vocabulary and
    caption length following `c.tokenizer` and the sample rate following `c.data`."""
    m = PRESETS[preset].to_config_dict()
    m.text.vocab_size = c.tokenizer.get_ref("vocab_size")
    m.text.max_length = c.tokenizer.get_ref("max_length")
    m.audio.sample_rate = c.data.get_ref("sample_rate")
    return m


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(crop_seconds=2.0)
    c.tokenizer = common.tokenizer()
    c.model = model(c, "clap_tiny")

    c.train = ml_collections.ConfigDict()
    c.train.steps = 500
    c.train.batch_size = 32
    c.train.lr = 1e-3
    c.train.warmup = 50
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0
    c.train.augment = ml_collections.ConfigDict()
    c.train.augment.clause_drop = 0.3  # drop each later clause of a caption
    c.train.augment.paraphrase = 0.5  # share of captions rewritten from the attributes
    c.train.augment.attribute_drop = 0.5  # drop each attribute but the instrument

    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=400)
    c.log = common.log(every_steps=50, audio_every_steps=0)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.crop_seconds = c.data.get_ref("crop_seconds")  # centre crops, as long as training's
    c.eval.every_steps = 0  # only at the end
    return c
