"""One sharding mechanism: parameters name their axes, `parallel` maps the names to the mesh.

The rules are checked on hand-made names and shapes; then every array of each model's training
state (the codec GAN, CLAP, the U-Net) is required to carry logical names, and the specs of
named parameters are checked under a (data, fsdp, tensor) = (2, 2, 2) mesh. The numeric side
(a tensor = 2 step equal to the single-device step) is `tests/diffusion/test_unet.py::
test_sharded_remat_step_equals_single_device`; the collectives are `test_hlo_collectives.py`'s.
"""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax import axes, parallel
from ldm_jax.config import get_config
from ldm_jax.nn.layers import dense, named


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_every_logical_name_has_a_rule_and_no_rule_names_a_parameter():
    assert set(parallel.LOGICAL_RULES) == set(axes.LOGICAL)
    assert set(parallel.LOGICAL_RULES.values()) <= {None, "fsdp", "tensor"}
    assert set(parallel.TABLE_ROWS) <= set(axes.LOGICAL)


def test_rules_split_tensor_then_fsdp_where_sizes_divide(mesh):
    spec = lambda names, shape: parallel.spec_for(names, shape, mesh)
    # Megatron pairs: column-parallel then row-parallel, fsdp on the other axis.
    assert spec(("embed", "mlp"), (128, 512)) == P("fsdp", "tensor")
    assert spec(("mlp", "embed"), (512, 128)) == P("tensor", "fsdp")
    # fsdp goes to the largest named axis it divides; taps and unnamed axes stay whole.
    assert spec(("conv_width", "conv_in", "conv_out"), (3, 256, 128)) == P(None, "fsdp", None)
    assert spec(("conv_width", "conv_in", "conv_out"), (3, 255, 128)) == P(None, None, "fsdp")
    assert spec((None, "conv_out"), (4096, 3)) == P()
    # A table's rows before its width, even when the width is larger.
    assert spec(("vocab", "embed"), (64, 128)) == P("fsdp", None)
    # Small arrays are not split over fsdp; tensor splits apply at any size.
    assert spec(("embed", "heads"), (32, 32)) == P(None, "tensor")
    assert spec(("embed",), (128,)) == P()
    assert spec(("cond_embed", "cond_embed"), (256, 256)) == P()
    assert spec((), ()) == P()
    # Mesh axes of size 1 split nothing.
    dp = parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    assert parallel.spec_for(("embed", "mlp"), (128, 512), dp) == P()


def test_bad_names_are_refused_with_a_message(mesh):
    with pytest.raises(parallel.ShardingError, match="no sharding rule for logical axis 'width'"):
        parallel.spec_for(("width",), (8,), mesh)
    with pytest.raises(parallel.ShardingError, match="2 logical axis names"):
        parallel.spec_for(("embed", "mlp"), (8,), mesh)
    with pytest.raises(ValueError, match="unknown logical axis name 'widht'"):
        named(nn.initializers.zeros, ("widht",))
    big = {"params": {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}}
    with pytest.raises(parallel.ShardingError, match="params/w .* has no logical axis names"):
        parallel.tree_shardings(big, mesh)


def test_names_survive_the_optimiser_and_the_layers_keep_their_initial_values(mesh):
    """Boxes pass through optax's init, so the moments are placed like their parameters."""
    import optax
    layer = dense(512, ("embed", "mlp"), name="fc")
    x = jnp.ones((2, 128))
    boxed = layer.init(jax.random.key(0), x)
    plain = nn.Dense(512, name="fc").init(jax.random.key(0), x)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), nn.meta.unbox(boxed), plain))
    state = jax.eval_shape(lambda: {"params": boxed, "opt": optax.adam(1e-3).init(boxed)})
    shardings = parallel.tree_shardings(state, mesh)
    assert shardings["params"]["params"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["params"]["params"]["bias"].spec == P("tensor")
    assert shardings["opt"][0].mu["params"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["opt"][0].count.spec == P()


def _codec_state():
    from ldm_jax.codec import train as codec_train
    cfg = get_config("codec_tiny")
    return functools.partial(codec_train.init_state, cfg,
                             crop_samples=codec_train.crop_samples(cfg))


def _codec_istft_fsq_state():
    from ldm_jax.codec import train as codec_train
    cfg = get_config("codec_tiny")
    cfg.model.update(decoder="istft", quantizer="fsq", quantizer_dropout=0.0)
    return functools.partial(codec_train.init_state, cfg,
                             crop_samples=codec_train.crop_samples(cfg))


def _clap_state():
    from ldm_jax.clap import train as clap_train
    cfg = get_config("clap_tiny")
    vocab = types.SimpleNamespace(vocab_size=int(cfg.model.text.vocab_size))
    return clap_train.make_task(cfg, vocab).init


def _unet_state():
    from ldm_jax.diffusion import train as ldm_train
    return functools.partial(ldm_train.init_state, get_config("ldm_tiny"))


def _judge_state():
    from ldm_jax.judge import train as judge_train
    return functools.partial(judge_train.init_state, get_config("judge_tiny"))


STATES = {"codec": _codec_state, "codec_istft_fsq": _codec_istft_fsq_state,
          "clap": _clap_state, "unet": _unet_state,
          "judge": _judge_state}

# (path, spec) under the (2, 2, 2) mesh, for named parameters of each model's tiny preset.
EXPECTED = {
    "codec": [
        ("params/decoder/conv_in/weight_v", P(None, None, "fsdp")),
        ("params/decoder/block_0/conv_t/weight_v", P(None, "fsdp", None)),
        ("params/encoder/conv_in/bias", P()),
        ("disc_params/period_2/conv_4/weight_v", P(None, None, "fsdp", None)),
    ],
    "codec_istft_fsq": [
        ("params/decoder/block_0/pwconv1/kernel", P("fsdp", "tensor")),
        ("params/decoder/block_0/pwconv2/kernel", P("tensor", "fsdp")),
        ("params/decoder/head/kernel", P(None, "fsdp")),  # [64, 642]: the wider axis
        ("params/decoder/block_0/gamma", P()),
        ("params/quantizer/in_proj/weight_v", P()),
    ],
    "clap": [
        ("params/text/transformer/block_0/attn/query/kernel", P("fsdp", "tensor")),
        ("params/text/transformer/block_0/attn/out/kernel", P("tensor", "fsdp")),
        ("params/audio/transformer/block_0/mlp/fc1/kernel", P("fsdp", "tensor")),
        ("params/audio/transformer/block_0/mlp/fc1/bias", P("tensor")),
        ("params/text/token_embedding/embedding", P("fsdp", None)),
        ("params/text/positions/position_embedding", P(None, "fsdp")),
        ("params/audio/stem_1/kernel", P(None, "fsdp", None)),
        ("params/logit_scale", P()),
    ],
    "judge": [
        ("params/conv_1/kernel", P(None, None, "fsdp")),  # [3, 64, 128]: the wider axis
        ("params/head_instrument/kernel", P()),
    ],
    "unet": [
        ("params/mid_attn/block_0/attn/query/kernel", P("fsdp", "tensor")),
        ("params/mid_attn/block_0/cross_attn/key/kernel", P("fsdp", "tensor")),
        ("params/mid_attn/block_0/mlp/fc2/kernel", P("tensor", "fsdp")),
        ("params/mid_res_0/conv1/kernel", P(None, "fsdp", None)),
        ("params/mid_res_0/emb_proj/kernel", P("fsdp", None)),
        ("params/time_embed/fc2/kernel", P()),
        ("ema_params/mid_attn/block_0/attn/query/kernel", P("fsdp", "tensor")),
        ("opt_state/1/0/mu/mid_attn/block_0/attn/query/kernel", P("fsdp", "tensor")),
    ],
}


@pytest.mark.parametrize("model", sorted(STATES))
def test_every_array_of_a_model_names_its_axes(model, mesh):
    state = jax.eval_shape(STATES[model](), jax.random.key(0))
    is_box = lambda x: isinstance(x, nn.Partitioned)
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_box)[0]
    unnamed = [parallel.path_str(p) for p, leaf in leaves
               if not is_box(leaf) and getattr(leaf, "ndim", 0) > 0]
    assert not unnamed, unnamed  # only scalars (the step, optimiser counts) go without names
    assert sum(is_box(leaf) for _, leaf in leaves) > 50
    shardings = parallel.tree_shardings(state, mesh)
    flat = {parallel.path_str(p): s.spec
            for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    for path, spec in EXPECTED[model]:
        assert flat[path] == spec, (path, flat[path])
    # The result has the unboxed state's structure, as jit's shardings must.
    assert (jax.tree_util.tree_structure(shardings)
            == jax.tree_util.tree_structure(nn.meta.unbox(state)))


def test_readme_sharding_example_runs():
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme[readme.index("## Sharding\n"):]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    block = ns["specs"]["params"]["text"]["transformer"]["block_0"]
    assert block["attn"]["query"]["kernel"].spec == P("fsdp", "tensor")
