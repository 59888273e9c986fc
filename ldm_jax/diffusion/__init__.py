"""Latent diffusion: noise schedules and objectives (`schedules`) and samplers (`samplers`).

The schedules follow DDPM (Ho et al., 2020) and latent diffusion (Rombach et al., 2022); the
samplers are DDPM, DDIM (Song et al., 2021), DPM-Solver++ 2M (Lu et al., 2022) and Euler
(Karras et al., 2022), with diffusers-compatible numerics.
"""

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

__all__ = [
    "OBJECTIVES",
    "SAMPLERS",
    "DiffusionError",
    "Plan",
    "SamplerState",
    "Schedule",
    "add_noise",
    "cfg_batched_model_fn",
    "cfg_model_fn",
    "get_velocity",
    "loss_weight",
    "make_plan",
    "make_schedule",
    "predict_eps",
    "predict_x0",
    "sample",
    "snr",
    "target",
]
