"""Diffusion samplers as plain functions: DDPM, DDIM, DPM-Solver++ (2M) and Euler.

Implements ancestral DDPM sampling (Ho et al., 2020), DDIM (Song et al., 2021) with `eta`,
multistep second-order DPM-Solver++ with the midpoint rule (Lu et al., 2022, "DPM-Solver++") and the
Euler sampler in sigma space (Karras et al., 2022, Algorithm 2 without churn), with the semantics of
diffusers 0.42's `DDPMScheduler`, `DDIMScheduler`, `DPMSolverMultistepScheduler`
(algorithm_type="dpmsolver++", solver_order=2, lower_order_final, final_sigmas_type="zero") and
`EulerDiscreteScheduler` (linear sigma interpolation, final sigma zero). On top of the solvers:
classifier-free guidance (Ho & Salimans, 2022) by wrapping the model function, inpainting by
replacing the known region with the forward-noised known latent at every step (as in latent
diffusion and RePaint, Lugmayr et al., 2022, without resampling), and image-to-image starts
(SDEdit, Meng et al., 2022).

Everything that depends only on the schedule and the number of steps is computed on the host with
NumPy into a `Plan`; the loop itself is one `jax.lax.scan`, so `sample` can be jitted and
differentiated with respect to x_T, the inputs of `model_fn` and its parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import schedules as sch

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler")
_SAMPLER_ALIASES = {"dpm++2m": "dpmpp_2m", "dpmsolver++": "dpmpp_2m"}
# diffusers' default spacing per scheduler.
_DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace",
                    "euler": "linspace"}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class Plan:
    """Host-side constants of one sampling run with `num_steps` steps.

    Attributes:
      sampler: canonical sampler name.
      objective: what the model predicts ('epsilon', 'v' or 'x0').
      timesteps: [N] the time value given to the model at each step (int64, float32 for Euler).
      init_noise_sigma: scale of the initial Gaussian noise.
      input_div: float32 [N]; the model sees x / input_div[i].
      signal, noise: float32 [N + 1]; at the start of step i (and, for i = N, at the end) the
        state is distributed as signal[i] * x0 + noise[i] * eps. Used to noise known data.
      coef: sampler-specific float32 [N] per-step constants.
      eta: DDIM stochasticity (0 for a deterministic sampler).
    """

    sampler: str
    objective: str
    timesteps: np.ndarray
    init_noise_sigma: float
    input_div: np.ndarray
    signal: np.ndarray
    noise: np.ndarray
    coef: Mapping[str, np.ndarray]
    eta: float = 0.0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def stochastic(self) -> bool:
        return self.sampler == "ddpm" or (self.sampler == "ddim" and self.eta > 0)


class SamplerState(NamedTuple):
    """Carry of the sampling loop.

    Attributes:
      x: current sample [B, ...] in the sampler's own parametrisation (scaled by sqrt(1 + sigma^2)
        relative to x_t for Euler).
      prev_x0: the previous step's data prediction (used by DPM-Solver++ 2M), shape of x.
      has_prev: float32 scalar, 1 once prev_x0 holds a prediction.
    """

    x: jax.Array
    prev_x0: jax.Array
    has_prev: jax.Array


def canonical_sampler(sampler: str) -> str:
    """Returns the canonical sampler name for `sampler` or an alias."""
    name = _SAMPLER_ALIASES.get(sampler, sampler)
    if name not in SAMPLERS:
        raise sch.DiffusionError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
    return name


def _sqrt(x) -> np.ndarray:
    return np.sqrt(np.asarray(x, _F32))


def _ddim_plan(ac: np.ndarray, ts: np.ndarray, eta: float, set_alpha_to_one: bool) -> dict:
    num_train = ac.shape[0]
    # diffusers steps DDIM to t - T // N whatever the spacing.
    prev = ts - num_train // ts.shape[0]
    final = _F32(1.0) if set_alpha_to_one else ac[0]
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(_F32)
    one = _F32(1.0)
    variance = ((one - a_prev) / (one - a_t)) * (one - a_t / a_prev)
    std = (_F32(eta) * _sqrt(variance)).astype(_F32)
    coef = {"alpha": a_t, "sqrt_alpha_prev": _sqrt(a_prev),
            # eta > 1 would ask for more noise than the posterior allows.
            "direction": _sqrt(np.maximum(one - a_prev - std * std, _F32(0.0))), "std": std}
    levels = np.concatenate([a_t[:1], a_prev])
    return {"coef": coef, "signal": _sqrt(levels), "noise": _sqrt(one - levels)}


def _ddpm_plan(ac: np.ndarray, ts: np.ndarray) -> dict:
    one = _F32(1.0)
    a_t = ac[ts]
    a_prev = np.concatenate([ac[ts[1:]], [one]]).astype(_F32)
    alpha_step = a_t / a_prev
    beta_step = one - alpha_step
    coef = {
        "alpha": a_t,
        "c_x0": (_sqrt(a_prev) * beta_step) / (one - a_t),
        "c_xt": (_sqrt(alpha_step) * (one - a_prev)) / (one - a_t),
        # Posterior variance ("fixed_small"); no noise on the step that reaches t = 0.
        "std": np.where(ts > 0, _sqrt(np.maximum((one - a_prev) / (one - a_t) * beta_step,
                                                 _F32(1e-20))), _F32(0.0)).astype(_F32),
    }
    levels = np.concatenate([a_t[:1], a_prev])
    return {"coef": coef, "signal": _sqrt(levels), "noise": _sqrt(one - levels)}


def _vp_from_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = _F32(1.0) / _sqrt(sigma * sigma + _F32(1.0))
    return alpha, (sigma * alpha).astype(_F32)


def _dpm_plan(ac: np.ndarray, ts: np.ndarray, lower_order_final: bool) -> dict:
    num = ts.shape[0]
    sigmas = np.concatenate([sch.sigmas_at(ac, ts), [_F32(0.0)]]).astype(_F32)
    alpha, sigma_vp = _vp_from_sigma(sigmas)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_vp)
    ratio = np.empty(num, _F32)
    phi = np.empty(num, _F32)
    inv_r0 = np.zeros(num, _F32)
    for i in range(num):
        if sigmas[i + 1] == 0:
            # exp(-h) = 0 at the clean end: the update returns the data prediction.
            ratio[i], phi[i] = 0.0, -alpha[i + 1]
        else:
            h = lam[i + 1] - lam[i]
            ratio[i] = sigma_vp[i + 1] / sigma_vp[i]
            phi[i] = alpha[i + 1] * (np.exp(-h) - _F32(1.0))
        # The first step has no history; the last is first order with a zero final sigma
        # (or, with lower_order_final, whenever fewer than 15 steps are taken).
        last_low = i == num - 1 and (sigmas[i + 1] == 0 or (lower_order_final and num < 15))
        if i > 0 and not last_low:
            inv_r0[i] = _F32(1.0) / ((lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i]))
    coef = {"alpha": alpha[:-1], "sigma": sigma_vp[:-1], "ratio": ratio, "phi": phi,
            "inv_r0": inv_r0}
    return {"coef": coef, "signal": alpha, "noise": sigma_vp}


def _euler_plan(ac: np.ndarray, ts: np.ndarray) -> dict:
    sigmas = np.concatenate([sch.sigmas_at(ac, ts), [_F32(0.0)]]).astype(_F32)
    sig = sigmas[:-1]
    var = sig * sig + _F32(1.0)
    coef = {"sigma": sig, "dt": (sigmas[1:] - sig).astype(_F32),
            "v_out": (-sig / _sqrt(var)).astype(_F32), "v_skip_div": var}
    return {"coef": coef, "signal": np.ones_like(sigmas), "noise": sigmas, "input_div": _sqrt(var)}


def make_plan(sampler: str, schedule: sch.Schedule, num_steps: int, objective: str = "epsilon",
              *, eta: float = 0.0, spacing: str | None = None, steps_offset: int = 0,
              set_alpha_to_one: bool = True, lower_order_final: bool = True) -> Plan:
    """Computes the per-step constants of a sampler on the host.

    Args:
      sampler: 'ddpm', 'ddim', 'dpmpp_2m' or 'euler'.
      schedule: a concrete (not traced) noise schedule.
      num_steps: number of sampling steps N.
      objective: what the model predicts: 'epsilon', 'v' or 'x0'.
      eta: DDIM noise scale (0 = deterministic DDIM, 1 = DDPM-like posterior noise).
      spacing: 'leading', 'trailing' or 'linspace'; None uses diffusers' default for the sampler
        (leading for DDPM/DDIM, linspace for DPM-Solver++ and Euler).
      steps_offset: added to 'leading' timesteps.
      set_alpha_to_one: DDIM's last step goes to alpha = 1 (True) or to alphas_cumprod[0].
      lower_order_final: DPM-Solver++ takes a first-order final step when N < 15.

    Returns:
      The `Plan`. As in diffusers, a DDIM step from t goes to t - T // N whatever the spacing
      (with 'linspace' that is not always the next timestep); DDPM goes to the next timestep.
    """
    sampler = canonical_sampler(sampler)
    objective = sch.canonical_objective(objective)
    if eta < 0:
        raise sch.DiffusionError(f"eta must be non-negative, got {eta}")
    if eta > 0 and sampler != "ddim":
        raise sch.DiffusionError(f"eta applies to the ddim sampler only, not {sampler!r}")
    ac = schedule.host_alphas_cumprod()
    num_train = ac.shape[0]
    spacing = spacing or _DEFAULT_SPACING[sampler]
    if sampler in ("ddpm", "ddim"):
        ts = sch.inference_timesteps(num_train, num_steps, spacing, steps_offset)
    elif sampler == "dpmpp_2m":
        ts = sch.dpm_solver_timesteps(num_train, num_steps, spacing, steps_offset)
    else:
        ts = sch.euler_timesteps(num_train, num_steps, spacing, steps_offset)
    if ts.max() >= num_train or ts.min() < 0:
        raise sch.DiffusionError(f"timesteps {ts.min()}..{ts.max()} leave the schedule's range "
                                 f"0..{num_train - 1}: lower steps_offset")
    if sampler == "ddim":
        parts = _ddim_plan(ac, ts, eta, set_alpha_to_one)
    elif sampler == "ddpm":
        parts = _ddpm_plan(ac, ts)
    elif sampler == "dpmpp_2m":
        parts = _dpm_plan(ac, ts, lower_order_final)
    else:
        parts = _euler_plan(ac, ts)
    init_sigma = 1.0
    if sampler == "euler":
        top = parts["noise"].max()
        init_sigma = float(top if spacing in ("linspace", "trailing") else _sqrt(top * top + 1))
    input_div = parts.get("input_div", np.ones(ts.shape[0], _F32))
    return Plan(sampler=sampler, objective=objective, timesteps=ts, init_noise_sigma=init_sigma,
                input_div=input_div, signal=parts["signal"], noise=parts["noise"],
                coef={k: np.asarray(v, _F32) for k, v in parts["coef"].items()}, eta=float(eta))


def _at(values: np.ndarray, i: jax.Array) -> jax.Array:
    return jnp.asarray(values)[i]


def init_state(x: jax.Array) -> SamplerState:
    """A fresh loop state holding the (already scaled) sample x."""
    x = jnp.asarray(x, jnp.float32)
    return SamplerState(x=x, prev_x0=jnp.zeros_like(x), has_prev=jnp.zeros((), jnp.float32))


def scale_model_input(plan: Plan, x: jax.Array, i: jax.Array) -> jax.Array:
    """What the model sees at step i: x itself, or x / sqrt(1 + sigma^2) for Euler."""
    return x / _at(plan.input_div, i)


def model_time(plan: Plan, i: jax.Array, batch: int) -> jax.Array:
    """The time value of step i for a batch: int32 [B], or float32 [B] for Euler."""
    dtype = jnp.float32 if plan.sampler == "euler" else jnp.int32
    return jnp.full((batch,), _at(plan.timesteps.astype(np.dtype(dtype)), i), dtype)


def _step_noise(rng: jax.Array | None, i: jax.Array, like: jax.Array, sampler: str) -> jax.Array:
    if rng is None:
        raise sch.DiffusionError(f"the {sampler} sampler is stochastic here: pass rng=a PRNG key")
    return jax.random.normal(jax.random.fold_in(rng, i), like.shape, like.dtype)


def _replace_state(state: SamplerState, x: jax.Array, x0: jax.Array) -> tuple[SamplerState, Any]:
    return SamplerState(x=x, prev_x0=x0, has_prev=jnp.ones((), jnp.float32)), x0


def ddim_step(plan: Plan, state: SamplerState, model_out: jax.Array, i: jax.Array,
              rng: jax.Array | None = None) -> tuple[SamplerState, jax.Array]:
    """One DDIM step from plan.timesteps[i] (formulas 12 and 16 of Song et al.).

    Args:
      plan: a 'ddim' plan.
      state: loop state at the start of step i.
      model_out: the model's prediction for scale_model_input(plan, state.x, i).
      i: step index (may be traced).
      rng: PRNG key, needed when plan.eta > 0; folded with i.

    Returns:
      (state after the step, predicted x0).
    """
    x, c = state.x, plan.coef
    alpha = _at(c["alpha"], i)
    x0, eps = sch.x0_and_eps(plan.objective, model_out, x, jnp.sqrt(alpha), jnp.sqrt(1.0 - alpha))
    x_next = _at(c["sqrt_alpha_prev"], i) * x0 + _at(c["direction"], i) * eps
    if plan.eta > 0:
        x_next = x_next + _at(c["std"], i) * _step_noise(rng, i, x, "ddim")
    return _replace_state(state, x_next, x0)


def ddpm_step(plan: Plan, state: SamplerState, model_out: jax.Array, i: jax.Array,
              rng: jax.Array | None = None) -> tuple[SamplerState, jax.Array]:
    """One ancestral DDPM step: a sample of the posterior q(x_prev | x_t, x0_pred).

    Same arguments and returns as `ddim_step`; rng is required.
    """
    x, c = state.x, plan.coef
    alpha = _at(c["alpha"], i)
    x0, _ = sch.x0_and_eps(plan.objective, model_out, x, jnp.sqrt(alpha), jnp.sqrt(1.0 - alpha))
    mean = _at(c["c_x0"], i) * x0 + _at(c["c_xt"], i) * x
    x_next = mean + _at(c["std"], i) * _step_noise(rng, i, x, "ddpm")
    return _replace_state(state, x_next, x0)


def dpmpp_2m_step(plan: Plan, state: SamplerState, model_out: jax.Array, i: jax.Array,
                  rng: jax.Array | None = None) -> tuple[SamplerState, jax.Array]:
    """One multistep DPM-Solver++ step (second order with the midpoint rule after the first step).

    Same arguments and returns as `ddim_step` (rng is unused); the previous data prediction is
    carried in state.prev_x0.
    """
    del rng
    x, c = state.x, plan.coef
    x0, _ = sch.x0_and_eps(plan.objective, model_out, x, _at(c["alpha"], i), _at(c["sigma"], i))
    phi = _at(c["phi"], i)
    # First order until a previous prediction exists (also after an image-to-image start).
    d1 = (_at(c["inv_r0"], i) * state.has_prev) * (x0 - state.prev_x0)
    x_next = _at(c["ratio"], i) * x - phi * x0 - (0.5 * phi) * d1
    return _replace_state(state, x_next, x0)


def euler_step(plan: Plan, state: SamplerState, model_out: jax.Array, i: jax.Array,
               rng: jax.Array | None = None) -> tuple[SamplerState, jax.Array]:
    """One Euler step of the probability-flow ODE in sigma space.

    Same arguments and returns as `ddim_step` (rng is unused); state.x is x_t * sqrt(1 + sigma^2).
    """
    del rng
    x, c = state.x, plan.coef
    sigma = _at(c["sigma"], i)
    if plan.objective == "epsilon":
        x0 = x - sigma * model_out
    elif plan.objective == "v":
        x0 = model_out * _at(c["v_out"], i) + x / _at(c["v_skip_div"], i)
    else:
        x0 = model_out
    derivative = (x - x0) / sigma
    return _replace_state(state, x + derivative * _at(c["dt"], i), x0)


STEP_FNS = {"ddim": ddim_step, "ddpm": ddpm_step, "dpmpp_2m": dpmpp_2m_step, "euler": euler_step}


def step(plan: Plan, state: SamplerState, model_out: jax.Array, i: jax.Array,
         rng: jax.Array | None = None) -> tuple[SamplerState, jax.Array]:
    """One step of `plan.sampler` (see `ddim_step` for the arguments)."""
    return STEP_FNS[plan.sampler](plan, state, model_out, i, rng)


def noise_to_level(plan: Plan, x0: jax.Array, noise: jax.Array, i: int | jax.Array) -> jax.Array:
    """Forward-noises clean data to the state distribution at the start of step i (i = N: end)."""
    return _at(plan.signal, i) * x0 + _at(plan.noise, i) * noise


def _start_index(num_steps: int, start_step: int | None, strength: float | None) -> int:
    if start_step is not None and strength is not None:
        raise sch.DiffusionError("give either start_step or strength, not both")
    if strength is not None:
        if not 0.0 <= strength <= 1.0:
            raise sch.DiffusionError(f"strength must be in [0, 1], got {strength}")
        return num_steps - min(int(num_steps * strength), num_steps)
    start = 0 if start_step is None else int(start_step)
    if not 0 <= start <= num_steps:
        raise sch.DiffusionError(f"start_step must be in [0, {num_steps}], got {start}")
    return start


def sample(sampler: str, model_fn: ModelFn, x_T: jax.Array, schedule: sch.Schedule,
           num_steps: int, objective: str = "epsilon", rng: jax.Array | None = None,
           eta: float = 0.0, *, spacing: str | None = None, steps_offset: int = 0,
           set_alpha_to_one: bool = True, lower_order_final: bool = True,
           inpaint: tuple[jax.Array, jax.Array] | None = None, x_init: jax.Array | None = None,
           start_step: int | None = None, strength: float | None = None,
           return_trajectory: bool = False, remat: bool = False):
    """Runs a sampler from Gaussian noise (or a noised x_init) to data.

    Args:
      sampler: 'ddpm', 'ddim', 'dpmpp_2m' or 'euler'.
      model_fn: model_fn(x, t) -> prediction of `objective`, with x [B, ...] and t [B] (int32, or
        float32 for Euler). Wrap with `cfg_model_fn` for classifier-free guidance.
      x_T: standard normal noise [B, ...]; also the noise used for x_init and inpainting.
      schedule: a concrete noise schedule (closed over, not a jit argument).
      num_steps: number of sampling steps N (static).
      objective: 'epsilon', 'v' or 'x0'.
      rng: PRNG key for DDPM and for DDIM with eta > 0.
      eta: DDIM noise scale.
      spacing, steps_offset, set_alpha_to_one, lower_order_final: see `make_plan`.
      inpaint: (x0_known [B, ...], mask broadcastable to it, 1 where known). Before the first step
        and after every step, the known region is replaced by x0_known noised with x_T to the
        current noise level; where the final level is clean it equals x0_known exactly.
      x_init: clean data [B, ...] to start from (image-to-image); noised with x_T to the level of
        the start step.
      start_step: index of the first step taken (steps before it are skipped).
      strength: alternative to start_step, as in diffusers' img2img: the fraction of the N steps
        that are run.
      return_trajectory: also return the intermediate states.
      remat: rematerialise each step in the backward pass (less memory when differentiating).

    Returns:
      The final sample [B, ...] (float32), or (sample, trajectory) with trajectory a dict of
      'samples' [n + 1, B, ...] (start state first), 'pred_x0' [n, B, ...], 'model_outputs'
      [n, B, ...] and 'timesteps' (NumPy [n]), where n = N - start.
    """
    plan = make_plan(sampler, schedule, num_steps, objective, eta=eta, spacing=spacing,
                     steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                     lower_order_final=lower_order_final)
    if plan.stochastic and rng is None:
        raise sch.DiffusionError(f"the {plan.sampler} sampler with eta={eta} is stochastic: "
                                 "pass rng=a PRNG key")
    start = _start_index(num_steps, start_step, strength)
    noise = jnp.asarray(x_T, jnp.float32)
    if start > 0 and x_init is None:
        raise sch.DiffusionError("starting after step 0 needs x_init (the data to noise)")
    if x_init is not None:
        x_init = jnp.asarray(x_init, jnp.float32)
        if x_init.shape != noise.shape:
            raise sch.DiffusionError(f"x_init has shape {x_init.shape}, x_T has {noise.shape}")
        x = noise_to_level(plan, x_init, noise, start)
    else:
        x = noise * plan.init_noise_sigma
    replace = _inpainter(plan, inpaint, noise)
    x = replace(x, start)
    batch = noise.shape[0]

    def body(state, i):
        model_out = model_fn(scale_model_input(plan, state.x, i), model_time(plan, i, batch))
        model_out = jnp.asarray(model_out, jnp.float32)
        state, x0 = step(plan, state, model_out, i, rng)
        state = state._replace(x=replace(state.x, i + 1))
        return state, (state.x, x0, model_out) if return_trajectory else None

    if remat:
        body = jax.checkpoint(body)
    indices = jnp.arange(start, num_steps, dtype=jnp.int32)
    state, ys = jax.lax.scan(body, init_state(x), indices)
    if not return_trajectory:
        return state.x
    trajectory = {"samples": jnp.concatenate([x[None], ys[0]]), "pred_x0": ys[1],
                  "model_outputs": ys[2], "timesteps": plan.timesteps[start:]}
    return state.x, trajectory


def _inpainter(plan: Plan, inpaint, noise: jax.Array) -> Callable[[jax.Array, Any], jax.Array]:
    if inpaint is None:
        return lambda x, i: x
    known, mask = (jnp.asarray(a, jnp.float32) for a in inpaint)
    if known.shape != noise.shape:
        raise sch.DiffusionError(f"inpaint data has shape {known.shape}, x_T has {noise.shape}")
    try:
        jnp.broadcast_shapes(mask.shape, known.shape)
    except ValueError:
        raise sch.DiffusionError(f"inpaint mask of shape {mask.shape} does not broadcast to "
                                 f"{known.shape}") from None

    def replace(x, i):
        return mask * noise_to_level(plan, known, noise, i) + (1.0 - mask) * x

    return replace


def cfg_model_fn(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance: uncond + scale * (cond - uncond).

    Args:
      model_fn_cond: conditional model_fn(x, t).
      model_fn_uncond: unconditional model_fn(x, t).
      scale: guidance scale; a Python 1.0 returns the conditional model unchanged.

    Returns:
      A model_fn(x, t) with the guided prediction.
    """
    if isinstance(scale, int | float) and scale == 1.0:
        return model_fn_cond

    def guided(x, t):
        uncond = model_fn_uncond(x, t)
        return uncond + scale * (model_fn_cond(x, t) - uncond)

    return guided


def cfg_batched_model_fn(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any,
                         uncond: Any, scale: float) -> ModelFn:
    """Classifier-free guidance with one model call on the doubled batch [uncond; cond].

    Args:
      model_fn: model_fn(x, t, context) -> prediction, with x [2B, ...], t [2B].
      cond: conditioning context, a pytree of [B, ...] arrays (e.g. text states and mask).
      uncond: the null context, same structure and shapes as `cond`.
      scale: guidance scale.

    Returns:
      A model_fn(x, t) with the guided prediction for x [B, ...].
    """
    context = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

    def guided(x, t):
        t = jnp.broadcast_to(t, (x.shape[0],))
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), context)
        uncond_out, cond_out = jnp.split(out, 2, axis=0)
        return uncond_out + scale * (cond_out - uncond_out)

    return guided
