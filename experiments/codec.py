"""Full-size codecs: the released DAC configurations and a continuous-latent VAE for diffusion.

`ldm-jax train codec --config codec:dac_44khz --workdir W` (also `dac_24khz`, `dac_16khz`,
`dac_44khz_16kbps`, `vae`). Training follows DAC's `conf/base.yml`: AdamW(1e-4, betas 0.8/0.99),
exponential decay 0.999996 per step, batch 72 of 0.38 s crops, 400k steps, MPD periods
2/3/5/7/11 and the multi-band STFT discriminator at 2048/1024/512, DAC's loss weights.
The model sections equal `ldm_jax.codec.model.PRESETS`, whose parameter counts match the released
checkpoints (76,651,890 for 44 kHz; 74,708,706 for 24 kHz; 74,175,906 for 16 kHz).

`vae` is a DAC-shaped autoencoder with a KL bottleneck of 64 channels at 44.1 kHz (hop 512),
trained without quantizer losses: continuous latents for the diffusion U-Net (stable-audio style).
"""

import ml_collections

from experiments import codec_tiny, common

PRESET_NAMES = ("dac_44khz", "dac_44khz_16kbps", "dac_24khz", "dac_16khz", "vae")


def model_section(preset: str) -> ml_collections.ConfigDict:
    from ldm_jax.codec.model import PRESETS
    if preset == "vae":
        return PRESETS["dac_44khz"].replace(quantizer="kl", latent_dim=64,
                                            quantizer_dropout=0.0).to_config_dict()
    return PRESETS[preset].to_config_dict()


def get_config(arg=None):
    preset = (arg or "dac_44khz").removeprefix("preset=")
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown codec preset {preset!r}; use one of {', '.join(PRESET_NAMES)}")
    c = codec_tiny.get_config()
    c.model = model_section(preset)
    c.model.dtype = "bfloat16"
    sr = c.model.sample_rate
    c.data = common.data(sample_rate=sr, crop_seconds=0.38, worker_count=8, clip_seconds=4.0,
                         num_train=8192, num_test=256)
    c.discriminator = ml_collections.ConfigDict(dict(
        periods=(2, 3, 5, 7, 11), fft_sizes=(2048, 1024, 512), rates=(), channels=32,
        max_channels=1024))
    c.train = ml_collections.ConfigDict(dict(
        steps=400_000, batch_size=72, lr=1e-4, disc_lr=1e-4, b1=0.8, b2=0.99, lr_decay=0.999996,
        weight_decay=0.0, eps=1e-8, grad_clip=1e3, disc_grad_clip=10.0, adversarial="lsgan",
        disc_start=0, ema_decay=0.0))
    # DAC's `conf/base.yml` weights: mel, adversarial and VQ terms only, no waveform terms.
    c.loss_weights["waveform/l1"] = 0.0
    c.loss_weights["waveform/si_sdr_loss"] = 0.0
    c.checkpoint = common.checkpoint(every_steps=5000, keep=3)
    c.log = common.log(every_steps=100, audio_every_steps=5000)
    c.eval = ml_collections.ConfigDict(dict(every_steps=10000, num_examples=256, batch_size=16))
    return c
