"""Music ControlNet: zero-initialised identity, gradients, frozen base, masks, sharded step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax import loop, parallel
from ldm_jax.diffusion import controlnet, controlnet_train
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.diffusion.unet import init_variables

LATENT, FRAMES, BATCH, CONTEXT = 8, 16, 8, 6
CHANNELS = 15  # melody 12 + dynamics 1 + rhythm 2


def base_config():
    return config_lib.get_config("ldm_tiny", [
        f"model.latent_channels={LATENT}", "model.base_channels=16", "model.channel_mult=(1,2)",
        "model.attention_levels=(1,)", "model.num_heads=2", "model.norm_groups=8",
        "model.context_dim=32", "model.pooled_dim=16", "diffusion.num_train_timesteps=100",
        "diffusion.cond_drop=0.3"])


def stage_config(*overrides):
    cfg = ml_collections.ConfigDict({
        "model": {"encoder_channels": (8, 8)},
        "masks": {"drop": 0.3, "span_prob": 0.5, "span_max": 0.8},
        "train": {"steps": 2, "batch_size": BATCH, "lr": 1e-3, "eps": 1e-2, "ema_decay": 0.9},
        "log": {"progress": False}, "seed": 0})
    for item in overrides:
        key, value = item.split("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    return controlnet_train.merged_config(cfg, base_config())


def random_like(tree, seed, std=0.1):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [(rng.normal(size=np.shape(x)) * std).astype(np.float32) for x in leaves])


def inputs(seed=0, batch=BATCH, frames=FRAMES):
    rng = np.random.default_rng(seed)
    return dict(x=rng.normal(size=(batch, frames, LATENT)).astype(np.float32),
                t=rng.integers(0, 100, batch).astype(np.int32),
                context=rng.normal(size=(batch, CONTEXT, 32)).astype(np.float32),
                context_mask=np.arange(CONTEXT)[None] < rng.integers(1, CONTEXT, (batch, 1)),
                pooled=rng.normal(size=(batch, 16)).astype(np.float32))


def random_controls(seed=0, batch=BATCH, frames=FRAMES):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(batch, frames, CHANNELS)).astype(np.float32) * 3
    mask = (rng.random((batch, frames, 3)) > 0.3).astype(np.float32)
    return values, mask


@pytest.fixture(scope="module")
def models():
    cfg = stage_config()
    unet = controlnet.base_unet(cfg)
    base = random_like(init_variables(unet, jax.random.key(0))["params"], seed=1)
    model = controlnet.make_controlnet(cfg.model)
    fresh = controlnet.init_params(model, jax.random.key(1))
    params = {**fresh, **controlnet.copied_from_base(fresh, base)}
    return cfg, unet, base, model, params


def test_config_copies_the_unet_and_refuses_shape_fields():
    cfg = stage_config()
    assert cfg.model.base_channels == 16 and tuple(cfg.model.controls) == \
        ("melody", "dynamics", "rhythm")
    assert controlnet.ControlNetConfig.from_dict(cfg.model).control_channels == CHANNELS
    with pytest.raises(DiffusionError, match="copies the trained U-Net's shape"):
        controlnet.controlnet_config(base_config().model, {"base_channels": 32})
    with pytest.raises(DiffusionError, match="model.controls"):
        controlnet.controlnet_config(base_config().model, {"controls": ("timbre",)})


def test_zero_initialised_controlnet_gives_the_base_model_exactly(models):
    _, unet, base, model, params = models
    x = inputs()
    want, _ = unet.apply({"params": base}, **x)
    for seed, scale in ((0, 1.0), (1, 2.5)):
        values, mask = random_controls(seed)
        got = controlnet.apply_controlled(unet, base, model, params, x["x"], x["t"],
                                          x["context"], x["context_mask"], x["pooled"], values,
                                          mask, scale=scale)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The copy holds the U-Net's own parameters; only the controls' layers are new.
    np.testing.assert_array_equal(params["down_0_res_0"]["conv1"]["kernel"],
                                  base["down_0_res_0"]["conv1"]["kernel"])
    new = sorted(k for k in params if k not in base)
    assert new[:3] == ["control_dynamics_0", "control_dynamics_1", "control_melody_0"]
    assert "zero_mid" in new and f"zero_skip_{len(unet.skip_levels()) - 1}" in new
    # Residuals of another U-Net's shape are refused.
    with pytest.raises(DiffusionError, match="skip residuals"):
        unet.apply({"params": base}, **x, residuals=([], jnp.zeros(1)))


def test_trained_controlnet_follows_the_scale_and_the_mask(models):
    _, unet, base, model, params = models
    params = {**params, **{k: random_like(v, seed=3, std=0.2) for k, v in params.items()
                           if k.startswith(("zero_", "control_out"))}}
    x = inputs()
    values, mask = random_controls()
    run = jax.jit(lambda v, m, s: controlnet.apply_controlled(
        unet, base, model, params, x["x"], x["t"], x["context"], x["context_mask"],
        x["pooled"], v, m, scale=s))
    base_out = np.asarray(unet.apply({"params": base}, **x)[0])
    np.testing.assert_allclose(run(values, mask, 0.0), base_out, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(run(values, mask, 1.0)) - base_out).max() > 1e-3
    # Masked values do not matter: only what the mask gives is read.
    other = np.where(np.repeat(mask, [12, 1, 2], axis=-1) > 0, values, 7.0)
    np.testing.assert_allclose(run(other, mask, 1.0), run(values, mask, 1.0), rtol=1e-5,
                               atol=1e-5)
    # A dynamics curve means the same at any reference level.
    shifted = values.copy()
    shifted[..., 12] += 20.0
    np.testing.assert_allclose(run(shifted, mask, 1.0), run(values, mask, 1.0), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(DiffusionError, match="controls must be"):
        model.apply({"params": params}, **x, controls=values[..., :12], control_mask=mask)


def test_masks_drop_controls_and_mask_spans():
    cfg = controlnet.ControlMaskConfig(drop=0.3, span_prob=0.5, span_max=0.8)
    m = np.asarray(controlnet.sample_masks(jax.random.key(0), 4000, 50, 3, cfg))
    assert m.shape == (4000, 50, 3) and set(np.unique(m)) <= {0.0, 1.0}
    per = m.sum(axis=1)  # frames given per example and control
    absent = np.mean(per == 0)
    assert abs(absent - 0.3) < 0.03
    partial = np.mean((per > 0) & (per < 50))
    assert abs(partial - 0.7 * 0.5) < 0.05
    # A partial mask is one contiguous span masked out: at most two runs given.
    row = m[:, :, 0][(per[:, 0] > 0) & (per[:, 0] < 50)]
    runs = (np.diff(np.pad(row, [(0, 0), (1, 1)]), axis=1) > 0).sum(axis=1)
    assert runs.max() <= 2 and per[:, 0][per[:, 0] > 0].min() >= 50 * (1 - 0.8) - 1


def training_batch(seed=0):
    x = inputs(seed)
    values, _ = random_controls(seed)
    mask = np.ones((BATCH, FRAMES), bool)
    mask[0, FRAMES // 2:] = False
    return {"latents": x["x"] * mask[..., None], "latents_mask": mask, "context": x["context"],
            "context_mask": x["context_mask"], "pooled": x["pooled"], "controls": values}


@pytest.fixture(scope="module")
def task_and_state():
    cfg = stage_config()
    unet = controlnet.base_unet(cfg)
    base = random_like(init_variables(unet, jax.random.key(0))["params"], seed=1)
    task = controlnet_train.training_task(cfg, base)
    boxed = jax.eval_shape(task.init, jax.random.key(0))
    state = jax.jit(lambda r: nn.meta.unbox(task.init(r)))(jax.random.key(0))
    state = dict(state)
    for key, values in task.warm_start(nn.meta.unbox(boxed)).items():
        state[key] = loop._place_subtrees(state[key], values, jax.tree_util.tree_map(
            lambda a: a.sharding, state[key]))
    return cfg, task, boxed, state, base


def test_one_step_trains_every_controlnet_leaf_and_never_the_base(task_and_state):
    _, task, _, state, base = task_and_state
    assert set(state) == {"step", "params", "opt_state", "ema_params", "base"}
    # The optimiser state mirrors the ControlNet's parameters alone.
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(state["base"]))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]))
    assert n_opt < 2 * n_params + 16 and n_base > 0
    step = jax.jit(task.step)
    rng = jax.random.key(3)
    after, metrics = step(state, training_batch(0), rng)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, after["base"], base)
    # After one step the zero convolutions are no longer zero, so every leaf gets a gradient
    # but those behind the control encoder's own zero-initialised output, which follow a step
    # later.
    def untrained(state, seed):
        grads, _ = task.grads(state, training_batch(seed), rng)
        return [parallel.path_str(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
                if not np.any(np.asarray(g))]

    behind = untrained(after, 1)
    assert behind and all(p.startswith("control_") and not p.startswith("control_out")
                          for p in behind), behind
    after, _ = step(after, training_batch(1), rng)
    assert not untrained(after, 2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after["base"], base)


def test_sharded_step_equals_the_single_device_step(task_and_state):
    _, task, boxed, state, _ = task_and_state
    host = jax.device_get(state)
    batch = training_batch(2)
    rng = jax.random.key(5)
    one, m1 = jax.jit(task.step)(host, batch, rng)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = parallel.tree_shardings(boxed, mesh)
    step = jax.jit(task.step, in_shardings=(shardings, parallel.batch_sharding(mesh),
                                            parallel.replicated(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    with jax.set_mesh(mesh):
        eight, m8 = step(jax.device_put(host, shardings), parallel.global_batch(mesh, batch), rng)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
                           jax.device_get(one["params"]), jax.device_get(eight["params"]))


def test_control_inputs_and_their_errors(models):
    _, _, _, model, params = models
    loaded = controlnet.LoadedControlNet(model, params, None, 0)
    rate, frames = 50.0, 101
    melody = {"frame_rate": rate, "num_frames": 101,
              "melody": {"one_hot": np.eye(12, dtype=np.float32)[np.arange(101) % 12]}}
    dyn = {"frame_rate": rate, "num_frames": 51,
           "dynamics": {"db": np.linspace(-30, 0, 51).astype(np.float32)}}
    values, mask = controlnet.control_inputs(loaded, {"melody": melody, "dynamics": dyn}, 2,
                                             frames, rate, {"dynamics": (0.0, 1.0)})
    assert values.shape == (2, frames, CHANNELS) and mask.shape == (2, frames, 3)
    np.testing.assert_array_equal(values[0, :, :12], melody["melody"]["one_hot"])
    assert mask[:, :, 0].all() and mask[:, :50, 1].all() and not mask[:, 50:, 1].any()
    assert not mask[:, :, 2].any()
    assert controlnet.controls_seconds({"melody": melody}, rate) == 2.0
    for bad, message in (({"timbre": melody}, "trained on melody, dynamics, rhythm, not on "
                                               "timbre"),
                         ({"dynamics": dyn}, "covers 1.00 s but is asked for up to 2.00 s"),
                         ({"melody": dyn}, "holds no melody"),
                         ({"melody": {**melody, "frame_rate": 25.0}}, "at 25 frames/s")):
        with pytest.raises(DiffusionError, match=message):
            controlnet.control_inputs(loaded, bad, 2, frames, rate)
    with pytest.raises(DiffusionError, match="empty or outside"):
        controlnet.control_inputs(loaded, {"melody": melody}, 1, frames, rate,
                                  {"melody": (3.0, 4.0)})
    with pytest.raises(DiffusionError, match="3 sets of controls for 2 prompts"):
        controlnet.control_inputs(loaded, [{"melody": melody}] * 3, 2, frames, rate)
