"""A tiny latent diffusion U-Net for CPU: the denoiser of the embedded synthetic-music chain.

A 1-D LDM U-Net (Rombach et al., 2022) at toy width: two levels of 64 and 128 channels, one ResNet
block per level, self- and cross-attention at the lower level and in the middle; 2,545,808
parameters. `model.latent_channels` matches `codec_tiny:vae` (latent_dim 16) and
`model.context_dim` / `model.pooled_dim` the tiny text tower.
"""

import ml_collections

from experiments import common

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
    c.model = ml_collections.ConfigDict(dict(
        latent_channels=16, patch_size=1, base_channels=64, channel_mult=(1, 2), num_res_blocks=1,
        attention_levels=(1,), num_heads=4, head_dim=0, transformer_depth=1, mlp_ratio=4,
        norm_groups=32, context_dim=128, pooled_dim=128, context_pooling="none", dropout=0.0,
        remat=False, remat_policy="nothing_saveable", dtype="float32"))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        objective="v", min_snr_gamma=5.0, snr_shift=1.0, cond_drop=0.1, normalize="global"))
    c.train = ml_collections.ConfigDict(dict(
        steps=2000, batch_size=16, lr=2e-4, warmup=100, lr_schedule="constant",
        weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, ema_decay=0.999,
        condition_on_audio=False, text_layer=-1))
    c.generation = ml_collections.ConfigDict(dict(
        prompts=PROMPTS, seconds=2.0, steps=50, sampler="dpmpp_2m", cfg_scale=3.0, seed=0,
        negative_prompt="", media_steps=25, batch_size=8))
    c.eval = ml_collections.ConfigDict(dict(
        num_prompts=32, seconds=2.0, steps=50, sampler="dpmpp_2m", cfg_scale=3.0, seed=0,
        batch_size=8))
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=500)
    c.log = common.log(every_steps=25, audio_every_steps=500)
    return c
