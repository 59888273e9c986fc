"""PyTorch peers of the ldm_jax training steps, timed beside them on the same device.

`unet_torch`: the 1-D latent diffusion U-Net of `ldm_jax.diffusion.unet`, layer for layer.
`dac_torch`: the Descript Audio Codec generator and discriminator training step (Kumar et al.,
2023) at a codec experiment's configuration.

Both need PyTorch (`pip install -e ".[peers]"`); nothing in `ldm_jax` imports them.
"""
