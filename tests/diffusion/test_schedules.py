"""Noise schedules, objectives and timestep spacings against diffusers 0.42 reference arrays.

Float comparisons use the relative error max|ours - ref| / max|ref| <= 1e-5 unless stated.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import schedules as S

REL_TOL = 1e-5
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012),
               "squaredcos_cap_v2": (None, None)}


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return np.load(os.path.join(fixtures_dir, "schedulers", "diffusers_schedules.npz"))


@pytest.fixture(scope="module")
def traj(fixtures_dir):
    return np.load(os.path.join(fixtures_dir, "schedulers", "diffusers_trajectories.npz"))


@pytest.mark.parametrize("name", sorted(BETA_RANGES))
def test_betas_and_alphas_cumprod_match_diffusers_exactly(ref, name):
    schedule = S.make_schedule(name, 1000, *BETA_RANGES[name])
    assert schedule.betas.dtype == np.float32 and schedule.alphas_cumprod.dtype == np.float32
    # Bitwise: float32 linspace with PyTorch's rounding, cumprod accumulated in float64.
    np.testing.assert_array_equal(schedule.betas, ref[f"ddpm_{name}_betas"])
    np.testing.assert_array_equal(schedule.alphas_cumprod, ref[f"ddpm_{name}_alphas_cumprod"])


def test_schedule_defaults_and_aliases():
    np.testing.assert_array_equal(S.make_schedule("cosine").betas,
                                  S.make_schedule("squaredcos_cap_v2").betas)
    scaled = S.make_schedule("scaled_linear")
    assert scaled.num_train_timesteps == 1000
    np.testing.assert_allclose(scaled.betas[[0, -1]], [0.00085, 0.012], rtol=1e-6)
    linear = S.make_schedule("linear", 10)
    np.testing.assert_allclose(linear.betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    assert np.all(np.diff(scaled.alphas_cumprod) < 0)
    # A Schedule is a pytree whose leaves are its two arrays.
    assert len(jax.tree.leaves(scaled)) == 2


def test_user_errors_are_diffusion_errors():
    with pytest.raises(S.DiffusionError, match="beta schedule"):
        S.make_schedule("quadratic")
    with pytest.raises(S.DiffusionError, match="objective"):
        S.canonical_objective("score")
    with pytest.raises(S.DiffusionError, match="spacing"):
        S.inference_timesteps(1000, 10, "uniform")
    with pytest.raises(S.DiffusionError, match="num_steps"):
        S.inference_timesteps(1000, 1001)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_ddim_timesteps_match_diffusers_exactly(ref, spacing, offset):
    ours = S.inference_timesteps(1000, 50, spacing, offset)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref[f"ddim50_{spacing}_offset{offset}_timesteps"])


def test_dpm_solver_and_euler_timesteps_and_sigmas(traj):
    ac = S.make_schedule("scaled_linear").alphas_cumprod
    dpm = S.dpm_solver_timesteps(1000, 20)
    np.testing.assert_array_equal(dpm, traj["dpmpp2m_eps_timesteps"])
    np.testing.assert_array_equal(S.sigmas_at(ac, dpm), traj["dpmpp2m_eps_sigmas"][:-1])
    euler = S.euler_timesteps(1000, 20)
    assert euler.dtype == np.float32
    np.testing.assert_array_equal(euler, traj["euler_eps_timesteps"])
    # Fractional timesteps interpolate the sigma table; within 1e-6 relative of diffusers.
    np.testing.assert_allclose(S.sigmas_at(ac, euler), traj["euler_eps_sigmas"][:-1], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(BETA_RANGES))
def test_add_noise_and_velocity_match_diffusers(ref, name):
    schedule = S.make_schedule(name, 1000, *BETA_RANGES[name])
    x0, noise, t = ref["noising_x0"], ref["noising_noise"], ref["noising_t"]
    assert rel_err(S.add_noise(schedule, x0, noise, t), ref[f"add_noise_{name}"]) <= REL_TOL
    assert rel_err(S.get_velocity(schedule, x0, noise, t), ref[f"velocity_{name}"]) <= REL_TOL
    np.testing.assert_allclose(S.target(schedule, "v", x0, noise, t), ref[f"velocity_{name}"],
                               atol=REL_TOL)


@pytest.mark.parametrize("objective", ["epsilon", "v", "x0"])
def test_objective_round_trip(ref, objective):
    schedule = S.make_schedule("scaled_linear")
    x0, noise = ref["noising_x0"], ref["noising_noise"]
    t = jnp.array([0, 250, 500, 900])
    x_t = S.add_noise(schedule, x0, noise, t)
    out = S.target(schedule, objective, x0, noise, t)
    assert rel_err(S.predict_x0(schedule, objective, out, x_t, t), x0) <= REL_TOL
    assert rel_err(S.predict_eps(schedule, objective, out, x_t, t), noise) <= REL_TOL
    if objective == "epsilon":
        np.testing.assert_array_equal(out, noise)
    if objective == "x0":
        np.testing.assert_array_equal(out, x0)


@pytest.mark.parametrize("objective", ["epsilon", "v", "x0"])
def test_min_snr_weight_equals_clipped_snr_weighted_x0_loss(ref, objective):
    """w * |target - pred|^2 == min(SNR, gamma) * |x0 - x0(pred)|^2 for every objective."""
    schedule = S.make_schedule("scaled_linear")
    x0, noise = ref["noising_x0"], ref["noising_noise"]
    t = jnp.array([5, 100, 400, 950])
    x_t = S.add_noise(schedule, x0, noise, t)
    tgt = S.target(schedule, objective, x0, noise, t)
    pred = tgt + 0.1 * jnp.cos(3.0 * tgt)
    weight = S.loss_weight(schedule, t, objective, min_snr_gamma=5.0)
    lhs = weight * jnp.sum((tgt - pred) ** 2, axis=(1, 2))
    x0_err = x0 - S.predict_x0(schedule, objective, pred, x_t, t)
    rhs = jnp.minimum(S.snr(schedule, t), 5.0) * jnp.sum(x0_err**2, axis=(1, 2))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
    np.testing.assert_array_equal(S.loss_weight(schedule, t, objective), np.ones(4, np.float32))


def test_snr_matches_definition(ref):
    schedule = S.make_schedule("linear")
    ac = ref["ddpm_linear_alphas_cumprod"]
    t = np.array([0, 10, 999])
    np.testing.assert_allclose(S.snr(schedule, t), ac[t] / (1 - ac[t]), rtol=1e-6)


@pytest.mark.parametrize("name", ["scaled_linear", "squaredcos_cap_v2"])
def test_snr_shift_divides_every_snr_and_keeps_betas_consistent(ref, name):
    base = S.make_schedule(name, 1000, *BETA_RANGES[name])
    shifted = S.make_schedule(name, 1000, *BETA_RANGES[name], snr_shift=8.0)
    t = np.arange(1000)
    np.testing.assert_allclose(S.snr(base, t) / S.snr(shifted, t), 8.0, rtol=1e-4)
    # The betas still generate the shifted alphas_cumprod, so every sampler sees one process.
    np.testing.assert_allclose(S.alphas_cumprod_from_betas(shifted.betas),
                               shifted.alphas_cumprod, rtol=1e-5)
    assert np.all((shifted.betas > 0) & (shifted.betas < 1))
    np.testing.assert_array_equal(S.make_schedule(name, 1000, *BETA_RANGES[name],
                                                  snr_shift=1.0).alphas_cumprod,
                                  ref[f"ddpm_{name}_alphas_cumprod"])
    with pytest.raises(S.DiffusionError, match="snr_shift"):
        S.make_schedule(name, snr_shift=0.0)
