"""The spectral front end traced under a mesh: per-device FFTs over the batch axes.

Under `jax.set_mesh`, `ldm_jax.audio.dsp` runs its transforms inside `jax.shard_map` over the
batch axes. On 8 simulated CPU devices these tests check that the results and gradients equal
those computed without a mesh, that the compiled programs move nothing between devices, and that
a batch the mesh does not divide falls back to the plain computation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import parallel
from ldm_jax.audio import dsp
from ldm_jax.codec import losses

MESHES = [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1}]
N_FFT, HOP = 64, 16


@pytest.fixture(scope="module")
def audio():
    return np.random.default_rng(0).standard_normal((8, 400)).astype(np.float32)


def stft_fn(x):
    return dsp.stft(x, n_fft=N_FFT, hop_length=HOP)


def log_mel_fn(x):
    return dsp.log_mel(x, 16000, n_fft=N_FFT, hop_length=HOP, n_mels=8)


def roundtrip_fn(x):
    return dsp.istft(dsp.stft(x, n_fft=N_FFT, hop_length=HOP), hop_length=HOP,
                     length=x.shape[-1])


def mel_loss_fn(x):
    # The estimate is a function of x so that the gradient flows through both STFTs.
    return losses.mel_loss(jnp.tanh(x)[..., None], x[..., None] * 0.5, 16000,
                           window_lengths=(32, 64), n_mels=(5, 10))


def _collectives(compiled_text: str) -> list[str]:
    ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return [line for line in compiled_text.splitlines() if any(f" {op}" in line for op in ops)]


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=["dp", "fsdp"])
@pytest.mark.parametrize("fn", [stft_fn, log_mel_fn, roundtrip_fn], ids=lambda f: f.__name__)
def test_batch_sharded_transform_equals_unsharded_and_stays_local(audio, mesh_cfg, fn):
    expected = jax.jit(fn)(audio)
    mesh = parallel.make_mesh(mesh_cfg)
    x = jax.device_put(audio, parallel.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh):
        jitted = jax.jit(fn)
        got = jitted(x)
        text = jitted.lower(x).compile().as_text()
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert _shard_mapped(mesh, fn, x)
    assert not _collectives(text)


def _shard_mapped(mesh, fn, x) -> bool:
    with jax.set_mesh(mesh):
        return "shard_map" in str(jax.make_jaxpr(fn)(x))


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=["dp", "fsdp"])
def test_gradient_through_sharded_losses_equals_unsharded(audio, mesh_cfg):
    grad = jax.value_and_grad(mel_loss_fn)
    loss, g = jax.jit(grad)(audio)
    mesh = parallel.make_mesh(mesh_cfg)
    x = jax.device_put(audio, parallel.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh):
        assert _shard_mapped(mesh, grad, x)
        loss_s, g_s = jax.jit(grad)(x)
    np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(g), rtol=1e-4, atol=1e-7)


def test_vmapped_and_indivisible_batches_under_a_mesh(audio):
    mesh = parallel.make_mesh(MESHES[0])
    stacked = np.stack([audio, -audio], axis=1)  # [8, 2, time]: vmap over the middle axis
    expected = jax.vmap(stft_fn, in_axes=1, out_axes=1)(stacked)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.vmap(stft_fn, in_axes=1, out_axes=1))(stacked)
        # Six rows do not split over eight devices: the plain computation runs.
        assert not _shard_mapped(mesh, stft_fn, audio[:6])
        odd = jax.jit(stft_fn)(audio[:6])
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(odd), np.asarray(jax.jit(stft_fn)(audio[:6])),
                               rtol=1e-6, atol=1e-6)
