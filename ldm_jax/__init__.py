"""ldm_jax: latent diffusion for music and audio in JAX.

A neural codec (RVQ-GAN / KL autoencoder), a CLAP-style contrastive text-audio encoder and a latent
diffusion U-Net with cross-attention, written as pure functions over parameter trees and sharded
across accelerators (see DESIGN.md of the project for the layout and data flow).
"""

__version__ = "0.1.0"
