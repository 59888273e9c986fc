"""CLAP on synthetic music at CPU smoke size (big_vision's `runlocal` role).

Two narrow towers (width 128; text 2 layers, audio 3 layers over 2-second crops) trained for a few
minutes on the default `synthetic_music` build (1024 training clips of 4 s). Captions are
augmented by attribute dropout and template paraphrase so that short zero-shot prompts ("a piece
played on an organ") are in distribution.

  ldm-jax data build synthetic_music --workdir W
  ldm-jax tokenizer train --workdir W
  ldm-jax train clap --config clap_tiny --workdir W
"""

import math

import ml_collections

from experiments import common


def model(c: ml_collections.ConfigDict, *, embed_dim: int, text: dict, audio: dict,
          dtype: str = "float32") -> ml_collections.ConfigDict:
    """The `model` section; vocabulary, caption length and sample rate follow `c`'s sections."""
    m = ml_collections.ConfigDict()
    m.embed_dim = embed_dim
    m.dtype = dtype
    m.remat = False
    m.logit_scale_init = math.log(1 / 0.07)
    m.logit_scale_max = math.log(100.0)
    m.text = ml_collections.ConfigDict()
    m.text.vocab_size = c.tokenizer.get_ref("vocab_size")
    m.text.max_length = c.tokenizer.get_ref("max_length")
    m.text.pooling = "eos"
    m.text.dropout_rate = 0.0
    m.text.update(text)
    m.audio = ml_collections.ConfigDict()
    m.audio.sample_rate = c.data.get_ref("sample_rate")
    m.audio.fmin = 0.0
    m.audio.fmax = None
    m.audio.mel_offset = -3.0
    m.audio.mel_scale = 2.0
    m.audio.stem_strides = (2, 2)
    m.audio.dropout_rate = 0.0
    m.audio.update(audio)
    return m


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(crop_seconds=2.0)
    c.tokenizer = common.tokenizer()
    c.model = model(
        c, embed_dim=128,
        text=dict(width=128, num_layers=2, num_heads=4, mlp_ratio=4.0),
        audio=dict(max_seconds=4.0, n_fft=512, hop_length=256, n_mels=64, width=128,
                   num_layers=3, num_heads=4, mlp_ratio=4.0))

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
