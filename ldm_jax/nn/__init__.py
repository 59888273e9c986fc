"""Layers shared by the models: weight-normalised convolutions and the Snake activation."""

from ldm_jax.nn.activations import Snake, snake
from ldm_jax.nn.conv import WNConv1d, WNConvTranspose1d, weight_norm

__all__ = ["Snake", "WNConv1d", "WNConvTranspose1d", "snake", "weight_norm"]
