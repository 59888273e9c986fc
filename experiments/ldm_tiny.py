"""A tiny latent diffusion U-Net for CPU: the denoiser of the embedded synthetic-music chain.

A 1-D LDM U-Net (Rombach et al., 2022) at toy width: two levels of 64 and 128 channels, one ResNet
block per level, self- and cross-attention at the lower level and in the middle; 2,545,808
parameters. `model.latent_channels` matches `codec_tiny:vae` (latent_dim 16) and
`model.context_dim` / `model.pooled_dim` the tiny text tower.
"""

import ml_collections

from experiments import common


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(clip_seconds=2.0, num_train=512, num_test=64)
    c.tokenizer = common.tokenizer()
    c.model = ml_collections.ConfigDict(dict(
        latent_channels=16, base_channels=64, channel_mult=(1, 2), num_res_blocks=1,
        attention_levels=(1,), num_heads=4, head_dim=0, transformer_depth=1, mlp_ratio=4,
        norm_groups=32, context_dim=128, pooled_dim=128, dropout=0.0, remat=False,
        remat_policy="nothing_saveable", dtype="float32"))
    c.train = ml_collections.ConfigDict(dict(steps=2000, batch_size=16, lr=2e-4))
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=500)
    c.log = common.log(every_steps=25, audio_every_steps=500)
    return c
