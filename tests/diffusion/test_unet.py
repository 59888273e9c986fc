"""Tests of the 1-D latent diffusion U-Net (`ldm_jax.diffusion.unet`) on the tiny preset.

Compilation dominates the cost on CPU, so the tests share a few jitted programs: one
forward-and-backward on a batch of 8 on one device, the same rematerialised and sharded over 8
simulated devices, and a handful of forward passes whose batch rows carry the variations to
compare. The model is the tiny preset with its transformer stage in the middle only. Parameters
are random values of the initialised shapes (from `jax.eval_shape`), so the zero-initialised
layers pass a signal and no init program is compiled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax import parallel
from ldm_jax.config import get_config
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.diffusion.unet import init_variables, make_unet, param_count

TINY_PARAMS = 2_545_808
TEST_PARAMS = 1_652_240  # the tiny preset without its level-1 transformer stages
B, T, L, C, D = 8, 16, 5, 16, 128  # batch, frames, text tokens, latent channels, text width


def make_test_model(**overrides):
    cfg = get_config("ldm_tiny").model
    cfg.update(overrides)
    return make_unet(cfg)


@pytest.fixture(scope="module")
def model():
    return make_test_model(attention_levels=())


def random_params(model):
    """Random values of the initialised shapes (zero-initialised layers pass a signal too)."""
    shapes = jax.eval_shape(lambda r: init_variables(model, r), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        scale = 1.0 if parallel.path_str(path).endswith("scale") else 0.0
        std = 0.05 if leaf.ndim < 2 else 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(scale + std * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def params(model):
    return random_params(model)


@pytest.fixture(scope="module")
def batch():
    ks = jax.random.split(jax.random.PRNGKey(7), 5)
    return dict(x=jax.random.normal(ks[0], (B, T, C)),
                t=jax.random.randint(ks[1], (B,), 0, 1000),
                context=jax.random.normal(ks[2], (B, L, D)),
                # 0, 1, ..., 5, 0, 1 valid tokens: row 0 and row 6 are fully masked.
                context_mask=jnp.arange(L)[None] < jnp.arange(B)[:, None] % (L + 1),
                pooled=jax.random.normal(ks[3], (B, D)),
                target=jax.random.normal(ks[4], (B, T, C)))


def _forward(model, params, batch):
    return model.apply(params, batch["x"], batch["t"], batch.get("context"),
                       batch.get("context_mask"), batch.get("pooled"))[0]


def _loss(model, params, batch):
    y = _forward(model, params, batch)
    return jnp.mean(jnp.square(y - batch["target"])), y


def _loss_and_grads(model):
    return jax.value_and_grad(functools.partial(_loss, model), has_aux=True)


@pytest.fixture(scope="module")
def reference(model, params, batch):
    """((loss, output [B, T, C]), grads) on one device."""
    return jax.device_get(jax.jit(_loss_and_grads(model))(params, batch))


@pytest.fixture(scope="module")
def out(reference):
    return reference[0][1]


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def _assert_same(result, reference, rtol_grads):
    (loss, y), grads = result
    (ref_loss, ref_y), ref_grads = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    # Some gradients are zero up to rounding (a key bias cancels in the softmax): their atol
    # comes from the largest gradient of the model.
    global_max = max(np.max(np.abs(g)) for g in jax.tree_util.tree_leaves(ref_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = _leaf(ref_grads, path)
        np.testing.assert_allclose(g, ref, rtol=rtol_grads,
                                   atol=1e-4 * np.max(np.abs(ref)) + 1e-7 * global_max,
                                   err_msg=parallel.path_str(path))


def test_param_count_of_tiny_preset(params):
    assert param_count(get_config("ldm_tiny")) == TINY_PARAMS
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == TEST_PARAMS


def test_output_shape_and_dtype(out):
    assert out.shape == (B, T, C) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.std(out) > 1e-2


def test_gradients_are_finite_and_reach_every_parameter(reference):
    (loss, _), grads = reference
    assert np.isfinite(loss)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = parallel.path_str(path)
        assert np.all(np.isfinite(g)), name
        # A key bias shifts all logits of a query equally, so its gradient is rounding noise.
        if not name.endswith("key/bias"):
            assert np.max(np.abs(g)) > 1e-8, name


def test_context_padding_pooled_and_timesteps(model, params, batch, out):
    """One forward pass whose rows vary the reference batch.

    Rows 0-3: four more padding tokens (large junk, mask False) and float timesteps: unchanged.
    Row 4: pooled embedding negated; row 5: another timestep; row 7: its one valid token
    changed: all changed.
    """
    junk = 50.0 * jax.random.normal(jax.random.PRNGKey(3), (B, 4, D))
    varied = dict(batch, context=jnp.concatenate([batch["context"], junk], axis=1),
                  context_mask=jnp.concatenate([batch["context_mask"], jnp.zeros((B, 4), bool)],
                                               axis=1),
                  t=batch["t"].astype(jnp.float32).at[5].add(300.0),
                  pooled=batch["pooled"].at[4].multiply(-1.0))
    varied["context"] = varied["context"].at[7, 0].multiply(-1.0)
    y = np.asarray(jax.jit(functools.partial(_forward, model))(params, varied))
    np.testing.assert_allclose(y[:4], out[:4], atol=1e-5, rtol=1e-5)
    for row in (4, 5, 7):
        assert np.max(np.abs(y[row] - out[row])) > 1e-3, row


def test_fully_masked_context_equals_no_context(model, params, batch, out):
    y = np.asarray(jax.jit(functools.partial(_forward, model))(
        params, dict(batch, context=None, context_mask=None)))
    assert np.all(np.isfinite(out[[0, 6]]))
    np.testing.assert_allclose(y[[0, 6]], out[[0, 6]], atol=1e-5, rtol=1e-5)
    assert np.max(np.abs(y[1:6] - out[1:6])) > 1e-3


def test_attention_pooled_context_joins_the_time_embedding(batch):
    """Imagen's pooling: padding is ignored, a real token matters, and the path is wired in."""
    pooling = make_test_model(attention_levels=(), context_pooling="attention")
    weights = random_params(pooling)
    added = sum(x.size for x in jax.tree_util.tree_leaves(weights["params"]["context_pool"]))
    assert sum(x.size for x in jax.tree_util.tree_leaves(weights)) == TEST_PARAMS + added + D
    assert added == 3 * (D * D + D) + D * 256 + 256
    mask = np.asarray(batch["context_mask"])
    junk = np.where(mask[..., None], np.asarray(batch["context"]), 50.0)
    varied = np.array(junk)
    varied[7, 0] *= -1.0  # row 7's one real token
    silenced = jax.tree_util.tree_map(lambda x: x, weights)
    silenced["params"]["context_pool"]["out"]["kernel"] = jnp.zeros((D, 256))
    forward = jax.jit(functools.partial(_forward, pooling))
    base = np.asarray(forward(weights, batch))
    y = np.asarray(forward(weights, dict(batch, context=jnp.asarray(junk))))
    np.testing.assert_allclose(y, base, atol=1e-5, rtol=1e-5)
    y = np.asarray(forward(weights, dict(batch, context=jnp.asarray(varied))))
    assert np.max(np.abs(y[7] - base[7])) > 1e-3
    np.testing.assert_allclose(np.delete(y, 7, 0), np.delete(base, 7, 0), atol=1e-5, rtol=1e-5)
    y = np.asarray(forward(silenced, batch))
    assert np.max(np.abs(y - base)) > 1e-3
    with pytest.raises(DiffusionError, match="context_pooling='attention' pools the text"):
        make_test_model(context_pooling="attention", context_dim=0)
    with pytest.raises(DiffusionError, match="model.context_pooling 'max'"):
        make_test_model(context_pooling="max")


def test_odd_length_is_padded_and_cropped(model, params, batch):
    y = jax.jit(functools.partial(_forward, model))(
        params, dict(batch, x=batch["x"][:2, :7], t=batch["t"][:2], context=batch["context"][:2],
                     context_mask=batch["context_mask"][:2], pooled=batch["pooled"][:2]))
    assert y.shape == (2, 7, C) and np.all(np.isfinite(np.asarray(y)))


def test_patches_fold_frames_into_channels(batch):
    """A patch-4 U-Net over [B, T, C] is the plain U-Net over [B, T / 4, 4 C], same weights."""
    patched = make_test_model(attention_levels=(), patch_size=4)
    plain = make_test_model(attention_levels=(), latent_channels=4 * C)
    assert patched.frame_multiple == 8
    weights = random_params(plain)
    folded = batch["x"].reshape(B, T // 4, 4 * C)
    y_plain = jax.jit(functools.partial(_forward, plain))(weights, dict(batch, x=folded))
    y_patched = jax.jit(functools.partial(_forward, patched))(weights, batch)
    assert y_patched.shape == (B, T, C)
    np.testing.assert_allclose(np.asarray(y_patched).reshape(B, T // 4, 4 * C),
                               np.asarray(y_plain), rtol=1e-5, atol=1e-5)
    with pytest.raises(DiffusionError, match="patch_size"):
        make_test_model(patch_size=0)


def test_bfloat16_compute_keeps_float32_output(params, batch, out):
    model = make_test_model(attention_levels=(), dtype="bfloat16")
    y = jax.jit(functools.partial(_forward, model))(params, batch)
    assert y.dtype == jnp.float32
    err = np.linalg.norm(np.asarray(y) - out) / np.linalg.norm(out)
    assert err < 0.05, err


def test_sharded_remat_step_equals_single_device(params, batch, reference):
    """Rematerialisation and sharding over 8 devices change how the step runs, not its result.

    One program checks both: a rematerialised model on a data x fsdp x tensor = 2 x 2 x 2 mesh
    (attention and MLP kernels split Megatron-style, the rest over fsdp), against the plain
    single-device reference (compiling a third program would double the test's cost).
    """
    model = make_test_model(attention_levels=(), remat=True,
                            remat_policy="dots_with_no_batch_dims_saveable")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(lambda r: init_variables(model, r, boxed=True), jax.random.key(0))
    param_shardings = parallel.tree_shardings(boxed, mesh)
    spec = lambda *names: _leaf(param_shardings["params"],
                                [jax.tree_util.DictKey(n) for n in names]).spec
    assert spec("mid_attn", "block_0", "attn", "query", "kernel") == P("fsdp", "tensor")
    assert spec("mid_attn", "block_0", "attn", "query", "bias") == P("tensor")
    assert spec("mid_attn", "block_0", "mlp", "fc2", "kernel") == P("tensor", "fsdp")
    assert spec("mid_attn", "block_0", "cross_attn", "key", "kernel") == P("fsdp", "tensor")
    assert spec("up_1_res_0", "conv1", "kernel") == P(None, "fsdp", None)
    assert spec("time_embed", "fc2", "kernel") == P()
    batch_shardings = parallel.batch_shardings(mesh, batch)
    step = jax.jit(_loss_and_grads(model), in_shardings=(param_shardings, batch_shardings),
                   out_shardings=((parallel.replicated(mesh), batch_shardings["x"]),
                                  param_shardings))
    # Traced under the mesh, the U-Net pins its activations to the batch axes.
    with jax.set_mesh(mesh):
        result = step(jax.device_put(params, param_shardings),
                      jax.device_put(batch, batch_shardings))
    kernel = result[1]["params"]["mid_attn"]["block_0"]["attn"]["query"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    _assert_same(jax.device_get(result), reference, 1e-4)


def test_user_errors_are_one_line(model, params):
    with pytest.raises(DiffusionError, match="latent_channels"):
        model.apply(params, jnp.zeros((1, 8, 3)), jnp.zeros((1,)))
    with pytest.raises(DiffusionError, match="context_dim"):
        model.apply(params, jnp.zeros((1, 8, C)), jnp.zeros((1,)), jnp.zeros((1, 4, 7)))
    with pytest.raises(DiffusionError, match="unknown U-Net config keys"):
        make_test_model(chanels=3)
    with pytest.raises(DiffusionError, match="remat_policy"):
        make_test_model(remat_policy="sometimes")
    with pytest.raises(DiffusionError, match="norm_groups"):
        make_test_model(base_channels=48)
