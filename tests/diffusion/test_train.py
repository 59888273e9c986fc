"""Latent diffusion training: the Task through the loop (save, resume), sharded steps, batches."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax import loop, parallel
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.clap import model as clap_model
from ldm_jax.clap.text import Tokenizer
from ldm_jax.config import ConfigError
from ldm_jax.data.latents import LatentStats
from ldm_jax.diffusion import conditioning
from ldm_jax.diffusion import config as diffusion_sections
from ldm_jax.diffusion import train as ldm_train
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.diffusion.unet import UNetConfig

LATENT, FRAMES, BATCH = 8, 16, 8
CAPTIONS = ["a slow organ melody in C major", "fast bell arpeggio in A minor, played loudly",
            "quiet plucked string chords", "a loud drum groove at 120 BPM",
            "mid-tempo synth lead tune in D major", "soft bass line in E minor"]


def random_tree(shapes, seed=0, std=0.05):
    """Random parameters from shapes alone (no initialiser is compiled): unit norm scales,
    zero biases, Gaussian weights."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = parallel.path_str(path).split("/")[-1]
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "logit_scale":
            return np.asarray(math.log(1 / 0.07), leaf.dtype)
        return (rng.normal(size=leaf.shape) * std).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_clap(batch_size=8):
    cfg = config_lib.get_config("clap_tiny", [
        "tokenizer.vocab_size=64", "tokenizer.max_length=12", "model.embed_dim=16",
        "model.text.width=32", "model.text.num_layers=1", "model.text.num_heads=2",
        "model.audio.width=32", "model.audio.num_layers=1", "model.audio.num_heads=2",
        "model.audio.max_seconds=0.5", "model.audio.n_fft=256", "model.audio.hop_length=128",
        "model.audio.n_mels=16"])
    shapes = jax.eval_shape(lambda r: clap_model.init_params(cfg, r), jax.random.key(0))
    tokenizer = Tokenizer.train(CAPTIONS * 8, vocab_size=64)
    return clap_model.ClapModel(cfg, random_tree(shapes, std=0.2), tokenizer,
                                batch_size=batch_size)


def random_state(abstract):
    """A training state with random parameters (EMA equal to them) and a fresh optimiser."""
    params = random_tree(abstract["params"], seed=2)
    return {"step": np.zeros((), np.int32), "params": params, "ema_params": params,
            "opt_state": jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                                abstract["opt_state"])}


def ldm_config(*overrides):
    return config_lib.get_config("ldm_tiny", [
        f"model.latent_channels={LATENT}", "model.base_channels=16", "model.channel_mult=(1,)",
        "model.attention_levels=()", "model.num_heads=2", "model.norm_groups=8",
        "model.context_dim=32", "model.pooled_dim=16", "train.steps=3",
        f"train.batch_size={BATCH}", "train.lr=1e-3", "train.warmup=1",
        # A large epsilon keeps Adam's first steps continuous in the gradient, so that float
        # reduction-order differences between meshes are not amplified into sign flips.
        "train.eps=1e-2", "train.ema_decay=0.9", "diffusion.cond_drop=0.5",
        "diffusion.num_train_timesteps=100", "log.progress=false", *overrides])


def make_stats():
    rng = np.random.default_rng(1)
    return LatentStats(mean=rng.normal(size=LATENT).astype(np.float32),
                       std=(1 + rng.random(LATENT)).astype(np.float32), scale_factor=0.5,
                       frame_rate=100.0, sample_rate=16000, num_frames=1000)


def host_batch(i):
    rng = np.random.default_rng(100 + i)
    mask = np.ones((BATCH, FRAMES), bool)
    mask[0, FRAMES // 2:] = False  # one clip shorter than the crop
    latents = rng.normal(size=(BATCH, FRAMES, LATENT)).astype(np.float32) * 2.0
    return {"latents": latents * mask[..., None], "latents_mask": mask,
            "caption": np.asarray([CAPTIONS[(i + j) % len(CAPTIONS)] for j in range(BATCH)])}


def batches(start=0):
    i = start
    while True:
        yield host_batch(i)
        i += 1


@pytest.fixture(scope="module")
def setup():
    cfg = ldm_config()
    clap = tiny_clap()
    task = ldm_train.make_task(cfg, clap, make_stats())
    return cfg, clap, task


def one_device():
    return parallel.make_mesh(devices=jax.devices()[:1])


def test_state_holds_params_optimiser_and_ema(setup):
    cfg, _, task = setup
    state = nn.meta.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    assert set(state) == {"step", "params", "opt_state", "ema_params"}
    assert jax.tree_util.tree_structure(state["ema_params"]) == \
        jax.tree_util.tree_structure(state["params"])
    assert state["params"]["conv_out"]["kernel"].shape == (3, 16, LATENT)
    # The config dataclass: a checkpoint from before a field existed is completed by its default.
    assert task.model_config == UNetConfig.from_dict(cfg.model)


def test_prepare_scales_latents_and_conditions_on_clap_text(setup):
    cfg, clap, task = setup
    batch = task.prepare(host_batch(0))
    raw = host_batch(0)
    np.testing.assert_allclose(batch["latents"], raw["latents"] * 0.5, rtol=1e-6)
    assert not batch["latents"][0, FRAMES // 2:].any()
    assert batch["context"].shape == (BATCH, 12, 32) and batch["pooled"].shape == (BATCH, 16)
    states, mask = clap.text_states(list(raw["caption"]))
    np.testing.assert_allclose(batch["context"], states, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch["context_mask"], mask)
    np.testing.assert_allclose(batch["pooled"], clap.embed_text(list(raw["caption"])),
                               rtol=1e-5, atol=1e-6)
    channel = ldm_train.Prepare(ldm_config("diffusion.normalize=channel"), clap, make_stats())
    z = channel(raw)["latents"]
    stats = make_stats()
    np.testing.assert_allclose(z[1], (raw["latents"][1] - stats.mean) / stats.std, rtol=1e-5)


def test_text_layer_picks_the_states_the_unet_reads(setup):
    _, clap, _ = setup
    raw = host_batch(0)
    captions = list(raw["caption"])
    batch = ldm_train.Prepare(ldm_config("train.text_layer=0"), clap, make_stats())(raw)
    tokens, mask = clap.tokenizer.encode(captions, clap.max_length)
    states, emb = clap_model.make_text_embedder(clap.cfg, 0)(clap.params, tokens, mask)
    np.testing.assert_allclose(batch["context"], states, rtol=1e-5, atol=1e-5)
    final, _ = clap.text_states(captions)
    assert np.abs(batch["context"] - final).max() > 0.1
    np.testing.assert_allclose(batch["pooled"], emb, rtol=1e-5, atol=1e-6)
    with pytest.raises(DiffusionError, match="train.text_layer: text layer 5 is outside"):
        ldm_train.Prepare(ldm_config("train.text_layer=5"), clap, make_stats())


def test_audio_conditioning_uses_the_clip_embedding(setup):
    _, clap, _ = setup
    cfg = ldm_config("train.condition_on_audio=True", "model.context_dim=16")
    prepare = ldm_train.Prepare(cfg, clap, make_stats())
    raw = host_batch(0)
    emb = np.random.default_rng(0).normal(size=(BATCH, 16)).astype(np.float32)
    batch = prepare({**raw, "clap_audio": emb})
    np.testing.assert_array_equal(batch["pooled"], emb)
    np.testing.assert_array_equal(batch["context"][:, 0], emb)
    assert batch["context_mask"].shape == (BATCH, 1) and batch["context_mask"].all()
    with pytest.raises(DiffusionError, match="clap_audio"):
        prepare(raw)
    # Sampling conditions the same slots on the prompt's text embedding.
    text = conditioning.text_condition(clap, ["a slow organ melody"], mode="embedding")
    np.testing.assert_allclose(text["pooled"], clap.embed_text(["a slow organ melody"]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(DiffusionError, match="context_dim"):
        ldm_train.make_task(ldm_config("train.condition_on_audio=True"), clap, make_stats())


def test_loop_resumes_and_eight_device_steps_equal_single_device_steps(setup, tmp_path):
    _, _, task = setup
    kw = dict(workdir=str(tmp_path), mesh=one_device(), seed=0,
              log_cfg={"every_steps": 1, "progress": False})
    # A random step-0 state (compiling the initialiser costs more than this whole test needs),
    # then 2 steps through the loop, save, restore, and a third step.
    boxed = jax.eval_shape(task.init, jax.random.key(0))
    abstract = nn.meta.unbox(boxed)
    state0 = random_state(abstract)
    ck = Checkpointer(str(tmp_path / "checkpoints"), model_config=task.model_config)
    ck.save(0, state0)
    ck.close()
    mesh8 = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    shardings = parallel.tree_shardings(boxed, mesh8)
    state = jax.device_put(state0, shardings)
    assert loop.train(task, batches(), num_steps=2, **kw).step == 2
    resumed = loop.train(task, batches(start=2), num_steps=3, **kw)
    assert resumed.step == 3 and int(resumed.state["step"]) == 3
    rows = [r for r in loop.read_history(str(tmp_path)) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) and np.isfinite(r["train/grad_norm"]) for r in rows)
    # Half of the captions are dropped to the null condition on average; the loss stays finite.
    assert any(r["train/cond_drop"] > 0 for r in rows)
    params, ema = jax.device_get((resumed.state["params"], resumed.state["ema_params"]))
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                          jax.tree_util.tree_leaves(ema))) > 0

    # The same three steps sharded over 8 devices (data 2 x fsdp 4), from the same state,
    # batches and keys.
    prepared = [task.prepare(host_batch(i)) for i in range(3)]
    batch_sharding = parallel.batch_shardings(mesh8, prepared[0])
    step = jax.jit(task.step, in_shardings=(shardings, batch_sharding,
                                            parallel.replicated(mesh8)),
                   out_shardings=(shardings, parallel.replicated(mesh8)))
    rng = jax.random.split(jax.random.key(0))[1]  # the loop's step key for seed 0
    losses = []
    for batch in prepared:
        state, metrics = step(state, parallel.global_batch(mesh8, batch), rng)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, [r["train/loss"] for r in rows], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
                           params, jax.device_get(state["params"]))
    # A batch whose every caption is dropped (all-masked context, zero pooled) trains to finite
    # values, as the condition dropout needs.
    null = {**prepared[0], **conditioning.null_condition(prepared[0])}
    _, metrics = step(state, parallel.global_batch(mesh8, null), rng)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))


def test_optimizer_warms_up_and_ema_decay_warms_up():
    cfg = ldm_config("train.warmup=10", "train.lr=1.0")
    _, lr = ldm_train.make_optimizer(cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(20)) == 1.0
    assert float(ldm_train.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(ldm_train.ema_decay_at(10**6, 0.999)) == pytest.approx(0.999)
    with pytest.raises(DiffusionError, match="unknown diffusion config"):
        diffusion_sections.diffusion_config({"diffusion": {"objectve": "v"}})



def test_gradient_accumulation_equals_the_large_batch_step(setup):
    """train.grad_accum_steps: k micro-batches of interleaved rows, one update: the whole
    batch's step up to float summation order; and refused where the batch does not split."""
    _, _, task = setup
    state = random_state(jax.eval_shape(task.init, jax.random.key(0)))
    batch = jax.tree_util.tree_map(jnp.asarray, task.prepare(host_batch(0)))
    rng = jax.random.key(3)
    whole, metrics = jax.jit(task.step)(state, batch, rng)
    for k in (2, 4):
        parts, part_metrics = jax.jit(loop.accumulating_step(task, k))(state, batch, rng)
        for name in ("params", "ema_params"):
            jax.tree_util.tree_map(
                lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
                jax.device_get(whole[name]), jax.device_get(parts[name]))
        for key in ("loss", "mse", "cond_drop", "grad_norm", "lr"):
            np.testing.assert_allclose(part_metrics[key], metrics[key], rtol=1e-5, err_msg=key)
    with pytest.raises(ConfigError, match="does not split into train.grad_accum_steps=3"):
        jax.jit(loop.accumulating_step(task, 3))(state, batch, rng)
    with pytest.raises(DiffusionError, match="must be >= 1 and divide train.batch_size"):
        ldm_train.train_config(ldm_config("train.grad_accum_steps=3"))
