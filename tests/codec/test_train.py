"""Codec GAN training: G+D steps lower the loss, sharded steps equal single-device steps, and the
codec's Task trains, saves and resumes through the shared loop."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax import loop, parallel
from ldm_jax.codec import train as codec_train


def tiny_cfg():
    cfg = config_lib.get_config("codec_tiny", [
        "model.encoder_dim=4", "model.decoder_dim=16", "model.latent_dim=16",
        "model.codebook_size=16", "model.n_codebooks=2", "discriminator.channels=2",
        "discriminator.max_channels=8", "train.disc_start=0", "train.batch_size=8",
        "data.crop_seconds=0.1", "train.lr=1e-3", "train.disc_lr=1e-3",
        # A large epsilon keeps Adam's first steps continuous in the gradient, so that float
        # reduction-order differences between meshes are not amplified into sign flips.
        "train.eps=1e-2"])
    with cfg.unlocked():
        cfg.discriminator.periods = (2, 3)
        cfg.discriminator.fft_sizes = (128,)
    return cfg


def batch_of(cfg, n=8):
    t = codec_train.crop_samples(cfg)
    phase = np.arange(t)[None] / cfg.model.sample_rate * np.linspace(200, 900, n)[:, None]
    return {"audio": (0.5 * np.sin(2 * np.pi * phase))[..., None].astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    init = jax.jit(functools.partial(codec_train.init_state, cfg,
                                     crop_samples=codec_train.crop_samples(cfg)))
    return cfg, init(jax.random.key(0))


def test_sharded_steps_equal_single_device_and_lower_the_loss(setup):
    cfg, state0 = setup
    batch = batch_of(cfg)
    results = []
    for mesh in (parallel.make_mesh(devices=jax.devices()[:1]),
                 parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})):
        shardings = parallel.tree_shardings(state0, mesh)
        state = jax.device_put(nn.meta.unbox(state0), shardings)
        gb = parallel.global_batch(mesh, batch)
        step = jax.jit(functools.partial(codec_train.train_step, cfg=cfg),
                       in_shardings=(shardings, parallel.batch_shardings(mesh, gb),
                                     parallel.replicated(mesh)),
                       out_shardings=(shardings, parallel.replicated(mesh)))
        history = []
        for _ in range(3):
            state, metrics = step(state, gb, jax.random.key(2))
            history.append(jax.device_get(metrics))
        results.append((jax.device_get(state["params"]), history))
    (p1, h1), (p8, h8) = results
    for key in ("mel/loss", "adv/gen_loss", "adv/feat_loss", "vq/commitment_loss", "disc/loss"):
        assert np.isfinite(h1[-1][key]), key
    assert h1[-1]["mel/loss"] < h1[0]["mel/loss"]
    for a, b in zip(h1, h8):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    # Three Adam steps move a parameter by at most 3e-3 (lr 1e-3); the GAN's many reductions
    # leave float noise of a few 1e-5 on rare near-zero-gradient entries, so compare at 5e-5.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=5e-5),
                           p1, p8)


def test_task_trains_saves_and_resumes_in_the_loop(setup, tmp_path):
    cfg, _ = setup
    batch = batch_of(cfg)

    def batches():
        while True:
            yield {"audio": batch["audio"][..., 0]}

    task = codec_train.make_task(cfg, media_audio=batch["audio"][0, :, 0])
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    kw = dict(workdir=str(tmp_path), mesh=mesh, logdir=str(tmp_path / "logs"),
              log_cfg={"every_steps": 1, "progress": False, "audio_every_steps": 2})
    first = loop.train(task, batches(), num_steps=2, **kw)
    assert first.step == 2 and len(first.history) >= 2
    resumed = loop.train(task, batches(), num_steps=3, **kw)
    assert resumed.step == 3
    assert [r["step"] for r in loop.read_history(str(tmp_path))][-1] == 3
