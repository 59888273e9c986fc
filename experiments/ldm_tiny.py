"""A tiny latent diffusion U-Net for CPU: the denoiser of the embedded synthetic-music chain.

A 1-D LDM U-Net (Rombach et al., 2022) at toy width: two levels of 64 and 128 channels, one ResNet
block per level, self- and cross-attention at the lower level and in the middle; 2,545,808
parameters. `model.latent_channels` matches `codec_tiny:vae` (latent_dim 16) and
`model.context_dim` / `model.pooled_dim` the tiny text tower.
"""

import ml_collections

from experiments import common
from ldm_jax.diffusion.config import (
    DiffusionConfig,
    EvalConfig,
    GenerationConfig,
    TrainConfig,
)
from ldm_jax.diffusion.unet import PRESETS

# Samples written after training (the first two are also drawn for TensorBoard during it).
PROMPTS = ("A slow organ melody in C major, played softly.",
           "Fast bell arpeggio in A minor at 140 BPM, played loudly.",
           "A mid-tempo plucked string chord progression in G major.",
           "Loud drum kit groove at 120 BPM.",
           "A quiet bass line in E minor at a relaxed pace.",
           "Upbeat synth lead tune in D major with drums.")


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Latent crops as long as the clips: the model sees whole 2-second clips.
    c.data = common.data(clip_seconds=2.0, num_train=512, num_test=64, crop_seconds=2.0)
    c.tokenizer = common.tokenizer()
    # The U-Net, diffusion and training defaults (`ldm_jax.diffusion`'s config dataclasses).
    c.model = PRESETS["ldm_tiny"].to_config_dict()
    c.diffusion = DiffusionConfig.config()
    c.train = TrainConfig.config(lr=2e-4, warmup=100, weight_decay=0.01)
    c.generation = GenerationConfig.config(prompts=PROMPTS, seconds=2.0)
    c.eval = EvalConfig.config(seconds=2.0)
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=500)
    c.log = common.log(every_steps=25, audio_every_steps=500)
    return c
