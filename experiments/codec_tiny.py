"""A tiny RVQ-GAN codec for CPU: learns the embedded synthetic music audibly in minutes.

DAC's architecture and losses at toy width: 16 kHz, hop 40 (rates 2·4·5), 4 codebooks of 256
entries (12.8 kbps at 400 frames/s). `ldm-jax train codec --config codec_tiny --workdir W`.
Variants: `codec_tiny:vae` swaps the RVQ for a KL bottleneck (continuous latents).
"""

import ml_collections

from experiments import common
from ldm_jax.codec.model import CodecConfig


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = common.data(clip_seconds=2.0, num_train=512, num_test=64, crop_seconds=0.25)
    c.model = CodecConfig.config(
        sample_rate=16000, encoder_dim=8, encoder_rates=(2, 4, 5), latent_dim=32, decoder_dim=64,
        decoder_rates=(5, 4, 2), n_codebooks=4, codebook_size=256, quantizer_dropout=0.5)
    c.model.sample_rate = c.data.get_ref("sample_rate")
    c.discriminator = ml_collections.ConfigDict(dict(
        periods=(2, 3, 5), fft_sizes=(512, 256), rates=(), channels=4, max_channels=32))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=8, lr=1e-3, disc_lr=3e-4, b1=0.8, b2=0.99, lr_decay=0.9995,
        weight_decay=0.0, eps=1e-8, grad_clip=1e3, disc_grad_clip=10.0, adversarial="lsgan",
        disc_start=600, ema_decay=0.0))
    c.loss_weights = ml_collections.ConfigDict({
        "mel/loss": 15.0, "adv/feat_loss": 2.0, "adv/gen_loss": 1.0,
        "vq/commitment_loss": 0.25, "vq/codebook_loss": 1.0, "kl/loss": 1e-4,
        "waveform/l1": 1.0, "waveform/si_sdr_loss": 2.0, "waveform/level_loss": 0.0})
    c.mesh = common.mesh()
    c.checkpoint = common.checkpoint(every_steps=250)
    c.log = common.log(every_steps=25, audio_every_steps=250)
    c.eval = ml_collections.ConfigDict(dict(every_steps=500, num_examples=32, batch_size=8))
    if arg == "vae":
        c.model.quantizer = "kl"
        c.model.latent_dim = 16
        c.model.quantizer_dropout = 0.0
    elif arg not in (None, ""):
        raise ValueError(f"unknown codec_tiny variant {arg!r}; use codec_tiny or codec_tiny:vae")
    return c
