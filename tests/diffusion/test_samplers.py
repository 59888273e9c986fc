"""Samplers against diffusers 0.42 trajectories, plus guidance, inpainting, img2img and gradients.

Trajectory comparisons use the relative error max|ours - ref| / max|ref| <= 1e-5 over the whole
stored array; timesteps are compared exactly.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers as P
from ldm_jax.diffusion import schedules as S

REL_TOL = 1e-5
# run name -> (sampler, objective, steps, plan options), as listed in configs.json.
RUNS = {
    "ddim_eps": ("ddim", "epsilon", 50, {"spacing": "trailing"}),
    "ddim_v": ("ddim", "v", 50, {"spacing": "trailing"}),
    "dpmpp2m_eps": ("dpmpp_2m", "epsilon", 20, {}),
    "dpmpp2m_v": ("dpmpp_2m", "v", 20, {}),
    "euler_eps": ("euler", "epsilon", 20, {}),
    "euler_v": ("euler", "v", 20, {}),
}


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


def analytic_model(timesteps):
    """model(x, t) = 0.5 tanh(x) + c(t), c(t) = float32(0.1 sin(float64(t) / 100)).

    c is tabulated on the host in float64 for the run's static timesteps and looked up by value.
    """
    table = jnp.asarray(np.float32(0.1 * np.sin(np.asarray(timesteps, np.float64) / 100)))
    steps = jnp.asarray(timesteps)

    def model(x, t):
        c = jnp.sum(jnp.where(steps[None, :] == t[:, None], table[None, :], 0.0), axis=1)
        return 0.5 * jnp.tanh(x) + c.reshape((-1,) + (1,) * (x.ndim - 1))

    return model


@pytest.fixture(scope="module")
def traj(fixtures_dir):
    data = np.load(os.path.join(fixtures_dir, "schedulers", "diffusers_trajectories.npz"))
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def schedule():
    return S.make_schedule("scaled_linear", 1000, 0.00085, 0.012)


@pytest.fixture(scope="module")
def toy():
    """Tiny batch for the property tests: x_T, known data and a mask."""
    k1, k2 = jax.random.split(jax.random.key(0))
    x_T = jax.random.normal(k1, (2, 6, 3))
    known = jax.random.normal(k2, (2, 6, 3))
    mask = jnp.zeros((1, 6, 1)).at[:, :3].set(1.0)
    return x_T, known, mask


@pytest.mark.parametrize("run", sorted(RUNS))
def test_free_running_trajectory_matches_diffusers(traj, schedule, run):
    sampler, objective, steps, options = RUNS[run]
    plan = P.make_plan(sampler, schedule, steps, objective, **options)
    np.testing.assert_array_equal(plan.timesteps, traj[f"{run}_timesteps"])
    np.testing.assert_allclose(plan.init_noise_sigma, traj[f"{run}_init_noise_sigma"][0],
                               rtol=1e-7)
    model = analytic_model(plan.timesteps)
    run_fn = jax.jit(lambda x_T: P.sample(sampler, model, x_T, schedule, steps, objective,
                                          return_trajectory=True, **options))
    final, trajectory = run_fn(traj["x_T"])
    samples = traj[f"{run}_samples"]
    assert trajectory["samples"].shape == samples.shape
    assert rel_err(trajectory["samples"], samples) <= REL_TOL
    assert rel_err(final, samples[-1]) <= REL_TOL
    assert rel_err(trajectory["model_outputs"], traj[f"{run}_model_outputs"]) <= REL_TOL
    if f"{run}_pred_original_samples" in traj:
        assert rel_err(trajectory["pred_x0"], traj[f"{run}_pred_original_samples"]) <= REL_TOL


@pytest.mark.parametrize("run", sorted(RUNS))
def test_teacher_forced_single_steps_match_diffusers(traj, schedule, run):
    """Each step from the stored sample and model output (and, for DPM-Solver++, the previous
    stored output) reproduces the next stored sample."""
    sampler, objective, steps, options = RUNS[run]
    plan = P.make_plan(sampler, schedule, steps, objective, **options)
    samples, outputs = traj[f"{run}_samples"], traj[f"{run}_model_outputs"]
    idx = jnp.arange(steps)

    scaled = jax.jit(jax.vmap(lambda x, i: P.scale_model_input(plan, x, i)))(samples[:-1], idx)
    assert rel_err(scaled, traj[f"{run}_model_inputs"]) <= REL_TOL

    def one(x, out, prev_x0, has_prev, i):
        state = P.SamplerState(x=x, prev_x0=prev_x0, has_prev=has_prev)
        new, x0 = P.step(plan, state, out, i)
        return new.x, x0

    steps_fn = jax.jit(jax.vmap(one))
    zeros = jnp.zeros_like(samples[:-1])
    _, x0s = steps_fn(samples[:-1], outputs, zeros, jnp.zeros(steps), idx)
    prev = jnp.concatenate([zeros[:1], x0s[:-1]])
    has_prev = (idx > 0).astype(jnp.float32)
    nxt, x0s = steps_fn(samples[:-1], outputs, prev, has_prev, idx)
    assert rel_err(nxt, samples[1:]) <= REL_TOL
    if f"{run}_pred_original_samples" in traj:
        assert rel_err(x0s, traj[f"{run}_pred_original_samples"]) <= REL_TOL


def test_ddpm_step_equals_ddim_with_eta_one(schedule, toy):
    """Ancestral DDPM is DDIM with eta = 1 (Song et al., 2021): same mean and variance."""
    x_T, _, _ = toy
    ddpm = P.make_plan("ddpm", schedule, 10)
    ddim = P.make_plan("ddim", schedule, 10, eta=1.0)
    np.testing.assert_array_equal(ddpm.timesteps, ddim.timesteps)
    out = 0.3 * jnp.sin(x_T)
    state = P.init_state(x_T)

    @jax.jit
    @jax.vmap
    def both(i):
        a, x0_a = P.ddpm_step(ddpm, state, out, i, jax.random.key(3))
        b, x0_b = P.ddim_step(ddim, state, out, i, jax.random.key(3))
        return a.x, b.x, x0_a, x0_b

    x_a, x_b, x0_a, x0_b = both(jnp.arange(10))
    np.testing.assert_allclose(x_a, x_b, atol=2e-5)
    np.testing.assert_allclose(x0_a, x0_b, atol=1e-6)


def test_ddpm_sampling_needs_rng_and_is_seeded(schedule, toy):
    x_T, _, _ = toy
    model = lambda x, t: 0.5 * jnp.tanh(x)
    with pytest.raises(S.DiffusionError, match="rng"):
        P.sample("ddpm", model, x_T, schedule, 5)
    run = jax.jit(lambda key: P.sample("ddpm", model, x_T, schedule, 5, rng=key))
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, run(jax.random.key(1)))


def test_user_errors(schedule, toy):
    x_T, known, _ = toy
    model = lambda x, t: x
    with pytest.raises(S.DiffusionError, match="sampler"):
        P.make_plan("heun", schedule, 10)
    with pytest.raises(S.DiffusionError, match="x_init"):
        P.sample("ddim", model, x_T, schedule, 10, start_step=3)
    with pytest.raises(S.DiffusionError, match="eta"):
        P.make_plan("euler", schedule, 10, eta=0.5)
    with pytest.raises(S.DiffusionError, match="concrete Schedule"):
        jax.jit(lambda s: P.make_plan("ddim", s, 10))(schedule)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])
def test_jit_grad_through_sampler(schedule, toy, sampler):
    x_T, _, _ = toy
    model = lambda x, t: 0.5 * jnp.tanh(x) + 0.001 * t.astype(jnp.float32)[:, None, None]

    def loss(x, remat=False):
        out = P.sample(sampler, model, x, schedule, 8, "epsilon", remat=remat)
        return jnp.mean(out**2)

    grad = jax.jit(jax.grad(loss))(x_T)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    remat_grad = jax.jit(jax.grad(functools.partial(loss, remat=True)))(x_T)
    np.testing.assert_allclose(remat_grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])
def test_inpainting_keeps_known_region(schedule, toy, sampler):
    x_T, known, mask = toy
    # Mixes along time so that the generated region sees the known one.
    model = lambda x, t: 0.5 * jnp.tanh(x) + 0.2 * jnp.mean(x, axis=1, keepdims=True)
    out = jax.jit(lambda x: P.sample(sampler, model, x, schedule, 10, "v",
                                     inpaint=(known, mask)))(x_T)
    keep = np.broadcast_to(np.asarray(mask, bool), out.shape)
    assert rel_err(np.asarray(out)[keep], np.asarray(known)[keep]) <= REL_TOL
    free = P.sample(sampler, model, x_T, schedule, 10, "v")
    # The generated region still depends on the known data through the denoiser.
    assert not np.allclose(np.asarray(out)[~keep], np.asarray(free)[~keep])


def test_cfg_scale_one_equals_conditional(schedule, toy):
    x_T, _, _ = toy
    cond = lambda x, t: 0.5 * jnp.tanh(x) + 0.1
    uncond = lambda x, t: 0.2 * x
    t = jnp.full((2,), 500)
    assert P.cfg_model_fn(cond, uncond, 1.0) is cond
    traced_one = jax.jit(lambda s, x: P.cfg_model_fn(cond, uncond, s)(x, t))(1.0, x_T)
    np.testing.assert_allclose(traced_one, cond(x_T, t), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(P.cfg_model_fn(cond, uncond, 0.0)(x_T, t), uncond(x_T, t))
    guided = P.cfg_model_fn(cond, uncond, 4.0)(x_T, t)
    np.testing.assert_allclose(guided, uncond(x_T, t) + 4.0 * (cond(x_T, t) - uncond(x_T, t)),
                               rtol=1e-6)
    a = P.sample("ddim", P.cfg_model_fn(cond, uncond, 1.0), x_T, schedule, 5)
    np.testing.assert_array_equal(a, P.sample("ddim", cond, x_T, schedule, 5))


def test_cfg_batched_matches_two_calls(toy):
    x_T, known, _ = toy
    ctx_model = lambda x, t, ctx: jnp.tanh(x) * ctx["scale"][:, None, None] + ctx["bias"]
    cond = {"scale": jnp.array([1.0, 2.0]), "bias": known}
    uncond = {"scale": jnp.zeros(2), "bias": jnp.zeros_like(known)}
    t = jnp.array([10, 10])
    batched = P.cfg_batched_model_fn(ctx_model, cond, uncond, 3.0)(x_T, t)
    split = P.cfg_model_fn(lambda x, t: ctx_model(x, t, cond),
                           lambda x, t: ctx_model(x, t, uncond), 3.0)(x_T, t)
    np.testing.assert_allclose(batched, split, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])
def test_img2img_starts_from_noised_init(schedule, toy, sampler):
    x_T, known, _ = toy
    model = lambda x, t: 0.5 * jnp.tanh(x)
    plan = P.make_plan(sampler, schedule, 10)
    final, trajectory = P.sample(sampler, model, x_T, schedule, 10, x_init=known, strength=0.6,
                                 return_trajectory=True)
    assert trajectory["samples"].shape[0] == 7  # start state + 6 of 10 steps
    np.testing.assert_array_equal(trajectory["timesteps"], plan.timesteps[4:])
    t0 = plan.timesteps[4]
    if sampler == "euler":
        sigma = S.sigmas_at(schedule.alphas_cumprod, [t0])[0]
        expected = known + sigma * x_T
    else:
        expected = S.add_noise(schedule, known, x_T, jnp.full((2,), int(t0)))
    assert rel_err(trajectory["samples"][0], expected) <= REL_TOL
    same = P.sample(sampler, model, x_T, schedule, 10, x_init=known, start_step=4)
    np.testing.assert_allclose(final, same, rtol=1e-6)
    untouched = P.sample(sampler, model, x_T, schedule, 10, x_init=known, strength=0.0)
    np.testing.assert_allclose(untouched, known, rtol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_oracle_denoiser_recovers_data(schedule, toy, sampler):
    """Given the exact epsilon of a single data point, a deterministic sampler returns it."""
    x_T, known, _ = toy
    ac = jnp.asarray(schedule.alphas_cumprod)

    def oracle(x, t):
        a = ac[t][:, None, None]
        return (x - jnp.sqrt(a) * known) / jnp.sqrt(1.0 - a)

    out = P.sample(sampler, oracle, x_T, schedule, 10)
    assert rel_err(out, known) <= REL_TOL
