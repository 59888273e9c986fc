"""Discrete-time variance-preserving noise schedules, objectives and loss weights.

Implements the forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) of DDPM
(Ho et al., 2020) with the linear, "scaled linear" (latent diffusion, Rombach et al., 2022) and
squared-cosine (Nichol & Dhariwal, 2021) beta schedules; the epsilon, v (Salimans & Ho, 2022) and
x0 training objectives with conversions between them; min-SNR-gamma loss weighting (Hang et al.,
2023); and the inference timestep spacings of Lin et al. (2023), Table 2.

Numerics follow diffusers 0.42 (`DDPMScheduler`, `DDIMScheduler.set_timesteps`,
`DPMSolverMultistepScheduler.set_timesteps`, `EulerDiscreteScheduler.set_timesteps`) bit for bit
where that is cheap: schedule arrays are computed on the host with NumPy so that they equal the
float32 arrays PyTorch produces (its float32 `linspace` rounds once per element, its `cumprod`
accumulates in float64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
OBJECTIVES = ("epsilon", "v", "x0")
SPACINGS = ("leading", "trailing", "linspace")

_SCHEDULE_ALIASES = {"cosine": "squaredcos_cap_v2"}
_OBJECTIVE_ALIASES = {"eps": "epsilon", "v_prediction": "v", "sample": "x0"}
# Customary beta ranges: DDPM for `linear`, latent diffusion for `scaled_linear`.
_DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


class DiffusionError(ValueError):
    """A diffusion schedule or sampler was asked for something it does not support."""


def canonical_objective(objective: str) -> str:
    """Returns the canonical objective name ('epsilon', 'v' or 'x0') for `objective` or an alias."""
    name = _OBJECTIVE_ALIASES.get(objective, objective)
    if name not in OBJECTIVES:
        raise DiffusionError(f"unknown diffusion objective {objective!r}: use one of {OBJECTIVES}")
    return name


def _torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """float32 linspace rounded like PyTorch's CPU kernel: one fused multiply-add per element."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(num - 1, 1)))
    idx = np.arange(num, dtype=np.float64)
    first = np.float64(start32) + step * idx
    second = np.float64(end32) - step * (num - 1 - idx)
    return np.where(idx < num // 2, first, second).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, np.float64).astype(np.float32)


def make_betas(name: str, num_train_timesteps: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> np.ndarray:
    """Beta schedule of the forward process.

    Args:
      name: 'linear', 'scaled_linear' or 'squaredcos_cap_v2' (alias 'cosine').
      num_train_timesteps: number of discrete training timesteps T.
      beta_start: first beta (linear schedules); defaults to 1e-4 for 'linear' and 0.00085 for
        'scaled_linear'. Ignored by the cosine schedule.
      beta_end: last beta; defaults to 0.02 for 'linear' and 0.012 for 'scaled_linear'.

    Returns:
      float32 [T] betas.
    """
    name = _SCHEDULE_ALIASES.get(name, name)
    if name not in BETA_SCHEDULES:
        raise DiffusionError(f"unknown beta schedule {name!r}: use one of {BETA_SCHEDULES}")
    if num_train_timesteps < 2:
        raise DiffusionError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if name == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    default_start, default_end = _DEFAULT_BETA_RANGE[name]
    start = default_start if beta_start is None else beta_start
    end = default_end if beta_end is None else beta_end
    if name == "linear":
        return _torch_linspace_f32(start, end, num_train_timesteps)
    roots = _torch_linspace_f32(start**0.5, end**0.5, num_train_timesteps)
    return roots * roots


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """Cumulative product of (1 - beta), accumulated in float64 and returned as float32 [T]."""
    alphas = np.float32(1.0) - np.asarray(betas, np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


@struct.dataclass
class Schedule:
    """A discrete variance-preserving noise schedule.

    The arrays are host (NumPy) float32 arrays: samplers derive their per-step constants from them
    outside `jit`. Inside jitted training code they are constants when closed over.

    Attributes:
      betas: float32 [T].
      alphas_cumprod: float32 [T], a_t = prod_{s<=t} (1 - beta_s).
      name: the beta schedule the arrays came from.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    name: str = struct.field(pytree_node=False, default="custom")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def host_alphas_cumprod(self) -> np.ndarray:
        """alphas_cumprod as a NumPy array; a clear error if the schedule was traced by `jit`."""
        try:
            return np.asarray(self.alphas_cumprod, np.float32)
        except jax.errors.TracerArrayConversionError:
            raise DiffusionError("samplers need a concrete Schedule: close over it instead of "
                                 "passing it as an argument to a jitted function") from None


def make_schedule(name: str = "scaled_linear", num_train_timesteps: int = 1000,
                  beta_start: float | None = None, beta_end: float | None = None,
                  snr_shift: float = 1.0) -> Schedule:
    """Builds a `Schedule` (see `make_betas` for the arguments and their defaults).

    `snr_shift` s divides the signal-to-noise ratio of every timestep by s, the shifted schedules
    of "simple diffusion" (Hoogeboom et al., 2023): a_t' = a_t / (a_t + s (1 - a_t)). Signals
    with many correlated values (long, high-rate latents) keep their global structure, such as
    pitch, visible under noise that hides a small image; s > 1 moves the timesteps where that
    structure is decided away from the last few. 1 leaves the schedule as diffusers builds it.
    """
    betas = make_betas(name, num_train_timesteps, beta_start, beta_end)
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    shift = float(snr_shift)
    if not shift > 0:
        raise DiffusionError(f"snr_shift must be positive, got {snr_shift}")
    if shift != 1.0:
        a = alphas_cumprod.astype(np.float64)
        a = a / (a + shift * (1.0 - a))
        betas = (1.0 - a / np.concatenate([[1.0], a[:-1]])).astype(np.float32)
        alphas_cumprod = a.astype(np.float32)
    return Schedule(betas=betas, alphas_cumprod=alphas_cumprod,
                    name=_SCHEDULE_ALIASES.get(name, name))


def _per_example(values: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes per-example values [B] (or a scalar) to broadcast against x [B, ...]."""
    values = jnp.asarray(values, jnp.float32)
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def _alpha_bar(schedule: Schedule, t: jax.Array) -> jax.Array:
    return jnp.asarray(schedule.alphas_cumprod, jnp.float32)[jnp.asarray(t, jnp.int32)]


def _signal_noise(schedule: Schedule, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    a = _per_example(_alpha_bar(schedule, t), x)
    return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio a_t / (1 - a_t) at integer timesteps t (any shape)."""
    a = _alpha_bar(schedule, t)
    return a / (1.0 - a)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Samples q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise.

    Args:
      schedule: the noise schedule.
      x0: clean data [B, ...].
      noise: standard normal noise, same shape as x0.
      t: int timesteps [B] (one per example) or a scalar.

    Returns:
      x_t, same shape as x0.
    """
    signal, sigma = _signal_noise(schedule, t, x0)
    return signal * x0 + sigma * noise


def get_velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v target sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho, 2022), shape of x0."""
    signal, sigma = _signal_noise(schedule, t, x0)
    return signal * noise - sigma * x0


def target(schedule: Schedule, objective: str, x0: jax.Array, noise: jax.Array,
           t: jax.Array) -> jax.Array:
    """Regression target of `objective` ('epsilon', 'v' or 'x0') for x_t = add_noise(x0, noise, t).

    Args:
      schedule: the noise schedule.
      objective: what the model predicts.
      x0: clean data [B, ...].
      noise: the noise used to make x_t, shape of x0.
      t: int timesteps [B] or a scalar.

    Returns:
      The target, shape of x0.
    """
    objective = canonical_objective(objective)
    if objective == "epsilon":
        return noise
    if objective == "v":
        return get_velocity(schedule, x0, noise, t)
    return x0


def x0_and_eps(objective: str, model_out: jax.Array, x_t: jax.Array, signal: jax.Array,
               noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Converts a model prediction to (x0, epsilon) for x_t = signal * x0 + noise * epsilon.

    Args:
      objective: what `model_out` predicts ('epsilon', 'v' or 'x0').
      model_out: the prediction, shape of x_t.
      x_t: the noisy input [B, ...].
      signal: sqrt(a_t), broadcastable against x_t.
      noise: sqrt(1 - a_t), broadcastable against x_t.

    Returns:
      (x0, eps), each of the shape of x_t.
    """
    objective = canonical_objective(objective)
    if objective == "epsilon":
        return (x_t - noise * model_out) / signal, model_out
    if objective == "v":
        return signal * x_t - noise * model_out, signal * model_out + noise * x_t
    return model_out, (x_t - signal * model_out) / noise


def predict_x0(schedule: Schedule, objective: str, model_out: jax.Array, x_t: jax.Array,
               t: jax.Array) -> jax.Array:
    """The clean data implied by a prediction of `objective` at timesteps t ([B] or scalar)."""
    return x0_and_eps(objective, model_out, x_t, *_signal_noise(schedule, t, x_t))[0]


def predict_eps(schedule: Schedule, objective: str, model_out: jax.Array, x_t: jax.Array,
                t: jax.Array) -> jax.Array:
    """The noise implied by a prediction of `objective` at timesteps t ([B] or scalar)."""
    return x0_and_eps(objective, model_out, x_t, *_signal_noise(schedule, t, x_t))[1]


def loss_weight(schedule: Schedule, t: jax.Array, objective: str,
                min_snr_gamma: float | None = None) -> jax.Array:
    """Per-example weight of the mean squared error on `objective`'s target.

    With min-SNR-gamma (Hang et al., 2023) every objective is weighted so that its loss equals the
    x0 loss weighted by min(SNR, gamma): epsilon by min(SNR, gamma) / SNR, v by
    min(SNR, gamma) / (SNR + 1) and x0 by min(SNR, gamma). Without gamma all weights are 1.

    Args:
      schedule: the noise schedule.
      t: int timesteps [B].
      objective: 'epsilon', 'v' or 'x0'.
      min_snr_gamma: the clipping value gamma (5 in the paper), or None for uniform weights.

    Returns:
      float32 [B] weights.
    """
    objective = canonical_objective(objective)
    ratio = snr(schedule, t)
    if min_snr_gamma is None:
        return jnp.ones_like(ratio)
    if min_snr_gamma <= 0:
        raise DiffusionError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
    clipped = jnp.minimum(ratio, min_snr_gamma)
    if objective == "epsilon":
        return clipped / ratio
    if objective == "v":
        return clipped / (ratio + 1.0)
    return clipped


def _check_steps(num_train_timesteps: int, num_steps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise DiffusionError(f"num_steps must be between 1 and num_train_timesteps "
                             f"({num_train_timesteps}), got {num_steps}")


def _check_spacing(spacing: str) -> None:
    if spacing not in SPACINGS:
        raise DiffusionError(f"unknown timestep spacing {spacing!r}: use one of {SPACINGS}")


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> np.ndarray:
    """Descending integer timesteps of a DDIM/DDPM sampler (diffusers `DDIMScheduler`).

    Args:
      num_train_timesteps: T.
      num_steps: number of sampling steps N.
      spacing: 'leading' (multiples of T // N, shifted by steps_offset), 'trailing' (ending at
        T - 1) or 'linspace' (from T - 1 down to 0).
      steps_offset: added to the 'leading' timesteps only.

    Returns:
      int64 [N] timesteps, largest first.
    """
    _check_steps(num_train_timesteps, num_steps)
    _check_spacing(spacing)
    if spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
        return steps.astype(np.int64)
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64)
        return steps + steps_offset
    ratio = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


def dpm_solver_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "linspace",
                         steps_offset: int = 0) -> np.ndarray:
    """Descending integer timesteps of DPM-Solver (diffusers `DPMSolverMultistepScheduler`).

    Unlike `inference_timesteps`, 'linspace' and 'leading' divide the range into N + 1 intervals
    and drop the last point, so the final step goes to the clean end of the schedule.

    Returns:
      int64 [N] timesteps, largest first.
    """
    _check_steps(num_train_timesteps, num_steps)
    _check_spacing(spacing)
    last = num_train_timesteps
    if spacing == "linspace":
        steps = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
        return steps.astype(np.int64)
    if spacing == "leading":
        ratio = last // (num_steps + 1)
        steps = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        return steps + steps_offset
    ratio = num_train_timesteps / num_steps
    return np.arange(last, 0, -ratio).round().astype(np.int64) - 1


def euler_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "linspace",
                    steps_offset: int = 0) -> np.ndarray:
    """Descending real-valued timesteps of the Euler sampler (diffusers `EulerDiscreteScheduler`).

    Returns:
      float32 [N] timesteps, largest first ('linspace' gives non-integer values).
    """
    _check_steps(num_train_timesteps, num_steps)
    _check_spacing(spacing)
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = (np.arange(num_steps) * ratio).round()[::-1].astype(np.float32)
        return steps + np.float32(steps_offset)
    ratio = num_train_timesteps / num_steps
    return np.arange(num_train_timesteps, 0, -ratio).round().astype(np.float32) - np.float32(1)


def sigmas_at(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Noise-to-signal ratios sigma = sqrt((1 - a) / a) at (possibly fractional) timesteps.

    Linear interpolation between the integer timesteps, in float64, of the float32 table, as
    diffusers does for `interpolation_type="linear"`.

    Args:
      alphas_cumprod: float32 [T].
      timesteps: [N] values in [0, T - 1].

    Returns:
      float32 [N] sigmas (without the final zero).
    """
    ac = np.asarray(alphas_cumprod, np.float32)
    table = np.sqrt((np.float32(1.0) - ac) / ac)
    sigmas = np.interp(np.asarray(timesteps, np.float64), np.arange(len(table)), table)
    return sigmas.astype(np.float32)
