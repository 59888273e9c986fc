"""The shared training loop on a toy regression task: resume exactness, NaN guard, config check."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax import loop, parallel
from ldm_jax.checkpoint import CheckpointError
from ldm_jax.config import ConfigError

DIM = 16


def make_task(lr=0.2, width=DIM, poison_at=None):
    tx = optax.adam(lr)

    def init(rng):
        params = {"w": jax.random.normal(rng, (width, 1)) * 0.1, "b": jnp.zeros((1,))}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def step(state, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        noise = 0.01 * jax.random.normal(rng, batch["y"].shape)

        def loss_fn(p):
            pred = batch["x"] @ p["w"] + p["b"]
            return jnp.mean((pred - batch["y"] - noise) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        if poison_at is not None:
            loss = jnp.where(state["step"] + 1 == poison_at, jnp.nan, loss)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, {"loss": loss}

    return loop.Task(name="toy", init=init, step=step, model_config={"width": width})


def make_iterator(batch=8, seed=0):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, DIM)).astype(np.float32)
    y = (x @ rng.standard_normal((DIM, 1))).astype(np.float32)
    records = [{"x": x[i], "y": y[i]} for i in range(64)]
    ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat().batch(batch)
    return iter(ds.to_iter_dataset())


def run(workdir, steps, mesh=None, **kw):
    task = kw.pop("task", None) or make_task()
    return loop.train(task, make_iterator(), workdir=str(workdir), num_steps=steps, mesh=mesh,
                      checkpoint_cfg={"every_steps": 3}, log_cfg={"every_steps": 2,
                                                                  "progress": False}, **kw)


def params_of(result):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(result.state["params"]))


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    full = run(tmp_path / "a", 7)
    run(tmp_path / "b", 4)  # stops at 4, saved at 4 with the iterator position
    resumed = run(tmp_path / "b", 7)
    assert resumed.step == 7
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_of(full), params_of(resumed))
    losses = [r["train/loss"] for r in full.history if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert loop.read_history(str(tmp_path / "a"))[-1]["step"] == 7


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLoss, match=r"at step 5.*last good checkpoint is step 3"):
        run(tmp_path, 8, task=make_task(poison_at=5))


def test_checkpoint_from_other_config_is_refused(tmp_path):
    run(tmp_path, 3)
    with pytest.raises(CheckpointError, match="width: checkpoint has 16, config has 8"):
        run(tmp_path, 6, task=make_task(width=8))


def test_a_config_field_added_with_its_default_keeps_old_checkpoints(tmp_path):
    import dataclasses
    import json

    from ldm_jax.checkpoint import MODEL_CONFIG, Checkpointer
    from ldm_jax.config import Section

    @dataclasses.dataclass(frozen=True)
    class Toy(Section):
        width: int = 16
        added: str = "old behaviour"

    directory = tmp_path / "ck"
    directory.mkdir()
    (directory / MODEL_CONFIG).write_text(json.dumps({"width": 16}))  # before `added` existed

    def check(model_config):
        ck = Checkpointer(str(directory), model_config=model_config, this_host_only=True)
        try:
            ck.check_config()
        finally:
            ck.close()

    check(Toy())
    with pytest.raises(CheckpointError, match="added: checkpoint has 'old behaviour'"):
        check(Toy(added="new"))
    with pytest.raises(CheckpointError, match="added: checkpoint has '.absent.'"):
        check({"width": 16, "added": "old behaviour"})


def test_sharded_steps_equal_single_device(tmp_path):
    one = run(tmp_path / "one", 3, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    eight = run(tmp_path / "eight", 3, mesh=parallel.make_mesh({"data": 2, "fsdp": 4,
                                                                "tensor": 1}))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           params_of(one), params_of(eight))


def make_split_task(lr=0.2):
    """The toy task with its step split into gradients of a part of the batch and an update."""
    tx = optax.adam(lr)
    base = make_task(lr)

    def grads(state, batch, rng, part=(0, 1)):
        i, k = part
        rng = jax.random.fold_in(rng, state["step"])
        shape = (batch["y"].shape[0] * k,) + batch["y"].shape[1:]
        noise = 0.01 * jax.random.normal(rng, shape)
        noise = loop.micro_rows(noise, i, k) if k > 1 else noise

        def loss_fn(p):
            return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"] - noise) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(state["params"])
        return g, {"loss": loss}

    def apply(state, g, metrics):
        updates, opt_state = tx.update(g, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def step(state, batch, rng):
        return apply(state, *grads(state, batch, rng))

    return loop.Task(name="toy", init=base.init, step=step, model_config=base.model_config,
                     grads=grads, apply=apply)


def test_the_loop_accumulates_gradients_over_micro_batches(tmp_path):
    whole = run(tmp_path / "a", 5, task=make_split_task())
    accumulated = run(tmp_path / "b", 5, task=make_split_task(), grad_accum_steps=4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6),
                           params_of(whole), params_of(accumulated))
    losses = [[r["train/loss"] for r in x.history if "train/loss" in r]
              for x in (whole, accumulated)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    with pytest.raises(ConfigError, match="toy cannot split a step into micro-batches"):
        run(tmp_path / "c", 2, grad_accum_steps=2)
