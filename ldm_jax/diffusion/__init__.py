"""Latent diffusion: the U-Net, noise schedules and objectives, samplers, generation.

The model contract of every family: `UNetConfig` (frozen), `make_model(config)` -> the Linen
`UNet`, `init_variables(model, rng)`, and `load(path_or_preset) -> (model, variables)` (a trained
LDM's EMA parameters, or a preset). `Generator` turns prompts into audio with a trained chain.

The schedules follow DDPM (Ho et al., 2020) and latent diffusion (Rombach et al., 2022); the
samplers are DDPM, DDIM (Song et al., 2021), DPM-Solver++ 2M (Lu et al., 2022) and Euler
(Karras et al., 2022), with diffusers-compatible numerics.
"""

from ldm_jax.diffusion.config import DiffusionConfig, TrainConfig
from ldm_jax.diffusion.generate import Generator, load
from ldm_jax.diffusion.samplers import (
    SAMPLERS,
    Plan,
    SamplerState,
    cfg_batched_model_fn,
    cfg_model_fn,
    make_plan,
    sample,
)
from ldm_jax.diffusion.schedules import (
    OBJECTIVES,
    DiffusionError,
    Schedule,
    add_noise,
    get_velocity,
    loss_weight,
    make_schedule,
    predict_eps,
    predict_x0,
    snr,
    target,
)
from ldm_jax.diffusion.unet import PRESETS, UNet, UNetConfig, init_variables, make_model

__all__ = [
    "OBJECTIVES",
    "PRESETS",
    "SAMPLERS",
    "DiffusionConfig",
    "DiffusionError",
    "Generator",
    "Plan",
    "SamplerState",
    "Schedule",
    "TrainConfig",
    "UNet",
    "UNetConfig",
    "add_noise",
    "cfg_batched_model_fn",
    "cfg_model_fn",
    "get_velocity",
    "init_variables",
    "load",
    "loss_weight",
    "make_model",
    "make_plan",
    "make_schedule",
    "predict_eps",
    "predict_x0",
    "sample",
    "snr",
    "target",
]
