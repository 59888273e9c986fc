"""What the sharded train steps send between devices, read from their compiled HLO.

On 8 simulated CPU devices the train step of each model (the latent U-Net, the codec GAN, CLAP)
is compiled, not run, as the training loop jits it (explicit state and batch shardings, traced
under the mesh), once data-parallel (data = 8) and once with FSDP (data 2 x fsdp 4). Then:

- data-parallel: nothing of the parameters is gathered, the all-reduced bytes are one copy of
  the gradients (the parameters' size), and no activation is exchanged;
- FSDP: parameters are gathered, and every collective moves a parameter, a shard of one or a
  scalar; none gathers the activations' batch.

Two exchanges are by design and allowed at their size: CLAP's InfoNCE needs every example's
embedding on every device, and the codec sums its codebook usage over the batch. XLA's SPMD
partitioner would gather the batch of every FFT input (the STFTs of the codec's losses and
CLAP's mel front end); `ldm_jax.audio.dsp` runs them inside `jax.shard_map` over the batch axes,
and `test_stft_frames_are_not_gathered` checks that no collective serves an FFT.

`benchmarks/hlo.py` parses the HLO text; its parser is checked on hand-written lines first.
The models are the tiny presets, cut to one transformer stage (U-Net) and one period
discriminator (codec) to keep the compiles short, as does a backend optimisation level of 0 (it
changes the generated machine code, not the HLO passes that place the collectives).
"""

import functools
import math
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ldm_jax import parallel
from ldm_jax.config import get_config

# benchmarks/ is a folder of scripts, not an installed package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import hlo  # noqa: E402

BATCH = 24  # global batch: a size no parameter axis has, so a gathered batch shows
MESHES = {"dp": {"data": 8, "fsdp": 1, "tensor": 1}, "fsdp": {"data": 2, "fsdp": 4, "tensor": 1}}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SDS = jax.ShapeDtypeStruct


def unet_case():
    from ldm_jax.diffusion import train as ldm_train
    # The middle transformer stage (self- and cross-attention) stands for those of the levels.
    cfg = get_config("ldm_tiny", ["model.attention_levels=()"])
    state = jax.eval_shape(functools.partial(ldm_train.init_state, cfg), jax.random.key(0))
    frames, tokens = 16, 8
    batch = {"latents": SDS((BATCH, frames, 16), jnp.float32),
             "latents_mask": SDS((BATCH, frames), jnp.bool_),
             "context": SDS((BATCH, tokens, cfg.model.context_dim), jnp.float32),
             "context_mask": SDS((BATCH, tokens), jnp.bool_),
             "pooled": SDS((BATCH, cfg.model.pooled_dim), jnp.float32)}
    return functools.partial(ldm_train.train_step, cfg=cfg), state, batch, ("params",)


def codec_case():
    from ldm_jax.codec import train as codec_train
    # One period discriminator keeps the compile short (the STFT discriminator's FFTs go through
    # the same `dsp.stft` as the mel loss's, see test_stft_frames_are_not_gathered).
    cfg = get_config("codec_tiny", ["discriminator.periods=(2,)", "discriminator.fft_sizes=()"])
    samples = codec_train.crop_samples(cfg)
    state = jax.eval_shape(
        lambda r: codec_train.init_state(cfg, r, crop_samples=samples), jax.random.key(0))
    batch = {"audio": SDS((BATCH, samples, 1), jnp.float32)}
    step = functools.partial(codec_train.train_step, cfg=cfg)
    return step, state, batch, ("params", "disc_params")


def clap_case():
    from ldm_jax.clap import train as clap_train
    cfg = get_config("clap_tiny")
    vocab, length = int(cfg.model.text.vocab_size), int(cfg.model.text.max_length)
    samples = int(float(cfg.data.crop_seconds) * int(cfg.model.audio.sample_rate))
    task = clap_train.make_task(cfg, types.SimpleNamespace(vocab_size=vocab))
    state = jax.eval_shape(task.init, jax.random.key(0))
    batch = {"tokens": SDS((BATCH, length), jnp.int32),
             "text_mask": SDS((BATCH, length), jnp.bool_),
             "audio": SDS((BATCH, samples), jnp.float32),
             "audio_mask": SDS((BATCH, samples), jnp.bool_)}
    return task.step, state, batch, ("params",)


CASES = {"unet": unet_case, "codec": codec_case, "clap": clap_case}


def compiled_hlo(step, state, batch, mesh) -> str:
    """The optimised HLO of `step` jitted as `ldm_jax.loop.train` jits it."""
    shardings = parallel.tree_shardings(state, mesh)
    state = nn.meta.unbox(state)
    with jax.set_mesh(mesh):
        jitted = jax.jit(step, donate_argnums=(0,),
                         in_shardings=(shardings, parallel.batch_shardings(mesh, batch),
                                       parallel.replicated(mesh)),
                         out_shardings=(shardings, parallel.replicated(mesh)))
        lowered = jitted.lower(state, batch, jax.random.key(0))
    return lowered.compile(compiler_options=FAST_COMPILE).as_text()


@pytest.fixture(scope="module")
def programs():
    """{(model, mesh): (collectives, parameter shapes, parameter bytes)}, compiled lazily."""
    cache = {}

    def get(model, mesh_name):
        if (model, mesh_name) not in cache:
            step, state, batch, groups = CASES[model]()
            leaves = [leaf for g in groups for leaf in jax.tree_util.tree_leaves(state[g])]
            shapes = {_key(leaf.shape) for leaf in leaves}
            nbytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)
            mesh = parallel.make_mesh(MESHES[mesh_name])
            cache[model, mesh_name] = (hlo.collectives(compiled_hlo(step, state, batch, mesh)),
                                       shapes, nbytes)
        return cache[model, mesh_name]

    return get


def _key(shape) -> tuple:
    """A shape up to axis order and unit axes (layouts and reshapes of the same array)."""
    return tuple(sorted(d for d in shape if d != 1))


def _parameter_like(shape, param_shapes) -> bool:
    """A parameter, or one FSDP shard of it (one axis divided by a mesh axis size)."""
    if _key(shape) in param_shapes:
        return True
    return any(_key(shape[:i] + (d * n,) + shape[i + 1:]) in param_shapes
               for i, d in enumerate(shape) for n in (2, 4, 8))


def _from_fft(entry) -> bool:
    return "/fft" in entry["source"]


def _exchange(model: str) -> int:
    """Elements per collective that a model exchanges by design, beyond parameters and scalars.

    CLAP's InfoNCE scores every audio embedding against every caption of the global batch, so
    the [batch, embed_dim] embeddings (and per-example loss terms) travel, as in CLIP. The
    codec sums its codebook usage [n_codebooks, codebook_size] over the batch for its metrics.
    Scalars (losses, norms) are small everywhere.
    """
    if model == "clap":
        return BATCH * int(get_config("clap_tiny").model.embed_dim)
    if model == "codec":
        m = get_config("codec_tiny").model
        return int(m.n_codebooks) * int(m.codebook_size)
    return 16


def _unexpected(ops, model, param_shapes, kinds):
    """Collectives of `kinds` that move neither a parameter nor an expected exchange."""
    return [e for e in ops if e["op"] in kinds
            and not _parameter_like(e["shape"], param_shapes)
            and math.prod(e["shape"]) > _exchange(model)]


def test_parser_reads_sync_async_and_tuple_collectives():
    text = "\n".join([
        "  %all-gather.8 = f32[128,64]{1,0} all-gather(%param.54), channel_id=12, "
        "replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}, "
        'metadata={op_name="jit(step)/jvp(UNet)/conv_in/conv_general_dilated"}',
        "  %all-reduce.1 = (f32[3,16]{1,0}, /*index=1*/bf16[]) all-reduce(%a, %b), "
        "replica_groups={{0,1},{2,3}}, to_apply=%add",
        "  %ags = (f32[8,4]{1,0}, f32[32,4]{1,0}) all-gather-start(f32[8,4]{1,0} %p), "
        "replica_groups=[2,4]<=[8], dimensions={0}",
        "  %ags.done = f32[32,4]{1,0} all-gather-done(%ags)",
        "  ROOT %rs = f32[2]{0} reduce-scatter(%g), replica_groups=[1,4]<=[4], dimensions={0}",
        "  %add.3 = f32[8]{0} add(%x, %y)",
    ])
    ops = hlo.collectives(text)
    assert [(e["op"], e["shape"], e["operand_shape"], e["dtype"], e["bytes"], e["group_size"])
            for e in ops] == [
        ("all-gather", (128, 64), (32, 64), "f32", 128 * 64 * 4, 4),
        ("all-reduce", (3, 16), (3, 16), "f32", 3 * 16 * 4, 2),
        ("all-reduce", (), (), "bf16", 2, 2),
        ("all-gather", (32, 4), (8, 4), "f32", 32 * 4 * 4, 4),
        ("reduce-scatter", (2,), (8,), "f32", 8 * 4, 4),
    ]
    assert ops[0]["source"] == "jit(step)/jvp(UNet)/conv_in/conv_general_dilated"
    totals = hlo.summary(ops)
    assert totals["all-reduce"]["ops"] == 1 and totals["all-reduce"]["arrays"] == 2
    assert totals["total"]["bytes"] == sum(e["bytes"] for e in ops)
    assert totals["all-gather"]["traffic_bytes"] == pytest.approx(0.75 * (128 * 64 + 32 * 4) * 4)
    assert totals["all-reduce"]["traffic_bytes"] == pytest.approx(2 * 0.5 * (3 * 16 * 4 + 2))


# All-reduced bytes over parameter bytes under data parallelism: one gradient copy each. (The
# codec's discriminator sees generated and real audio in one pass, so its gradient is reduced once.)
DP_REDUCE_RANGE = {"unet": (0.99, 1.01), "clap": (0.95, 1.01), "codec": (0.99, 1.01)}


@pytest.mark.parametrize("model", sorted(CASES))
def test_data_parallel_exchanges_only_gradients(programs, model):
    ops, param_shapes, param_bytes = programs(model, "dp")
    assert not _unexpected(ops, model, param_shapes, hlo.OPS)
    assert {e["op"] for e in ops} <= {"all-reduce", "all-gather"}
    total = sum(e["bytes"] for e in ops if e["op"] == "all-reduce")
    low, high = DP_REDUCE_RANGE[model]
    assert low * param_bytes <= total <= high * param_bytes + 4096, (total, param_bytes)
    # Parameters are replicated: nothing of them is gathered.
    assert not [e for e in ops if e["op"] == "all-gather"
                and _parameter_like(e["shape"], param_shapes)
                and math.prod(e["shape"]) > _exchange(model)]


@pytest.mark.parametrize("model", sorted(CASES))
def test_fsdp_gathers_parameters_not_activations(programs, model):
    ops, param_shapes, param_bytes = programs(model, "fsdp")
    gathers = [e for e in ops if e["op"] == "all-gather"]
    assert [e for e in gathers if _parameter_like(e["shape"], param_shapes)], \
        "FSDP-sharded parameters must be gathered"
    assert not _unexpected(ops, model, param_shapes, hlo.OPS)
    assert not [e for e in gathers if BATCH in e["shape"] and
                math.prod(e["shape"]) > _exchange(model)]
    # Each gathered parameter serves the forward and the backward pass; many more gathered
    # bytes than that would mean something else is being assembled.
    gathered = sum(e["bytes"] for e in gathers)
    assert gathered <= 4 * param_bytes, (gathered, param_bytes)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("model", ["codec", "clap"])
def test_stft_frames_are_not_gathered(programs, model, mesh_name):
    ops, _, _ = programs(model, mesh_name)
    assert not [e for e in ops if _from_fft(e)]
