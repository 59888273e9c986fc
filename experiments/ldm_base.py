"""A music-LDM-sized 1-D latent diffusion U-Net for accelerators.

The AudioLDM / MusicLDM denoiser (Rombach et al., 2022; Liu et al., 2023; Chen et al., 2023)
rebuilt in 1-D over codec latent frames: base width 192 with multipliers (1, 2, 3, 4), two ResNet
blocks per level, transformer stages (self- and cross-attention, 64-wide heads) at levels 1-3 and
in the middle, bfloat16 compute and rematerialised blocks. 188,949,952 parameters
(`ldm_jax.diffusion.unet.param_count`), in the range of the 2-D U-Nets of AudioLDM and MusicLDM
(about 180-260 M). Text states of width 768 (`context_dim`) and a 512-wide pooled CLAP
embedding (`pooled_dim`) condition it; `latent_channels` must equal the codec's latent_dim.
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


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(clip_seconds=10.0, crop_seconds=10.0)
    c.tokenizer = common.tokenizer(vocab_size=8192, max_length=64)
    c.model = PRESETS["ldm_base"].to_config_dict()
    c.diffusion = DiffusionConfig.config()
    c.train = TrainConfig.config(steps=200_000, batch_size=256, warmup=5000, weight_decay=0.01,
                                 ema_decay=0.9999)
    c.generation = GenerationConfig.config(
        prompts=("An upbeat electronic track with a driving bassline.",
                 "A calm solo piano piece in A minor.",
                 "A string quartet playing a slow, melancholic melody.",
                 "Energetic rock drums with distorted electric guitars."),
        seconds=10.0, steps=100, cfg_scale=3.5, media_steps=50, batch_size=16)
    c.eval = EvalConfig.config(num_prompts=512, seconds=10.0, steps=100, cfg_scale=3.5,
                               batch_size=16)
    c.mesh = common.mesh(data=-1, fsdp=1, tensor=1)
    c.checkpoint = common.checkpoint(every_steps=5000, keep=3)
    c.log = common.log(every_steps=100, audio_every_steps=5000)
    return c
