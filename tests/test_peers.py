"""Tests of the PyTorch peers in `benchmarks/peers/` (skipped where PyTorch is not installed).

The U-Net peer must be the same network as `ldm_jax.diffusion.unet`: equal parameter counts per
top-level layer for the tiny and base presets, and equal outputs for the same weights. The DAC
peer must be DAC: the state-dict keys and shapes of the released 44.1 kHz model, the reference
outputs of DAC's own code on the seeded tiny checkpoint in the shared fixtures, and the
generator and discriminator sizes of `ldm_jax.codec` at `codec:dac_44khz`. Each train step then
runs once at tiny size. Large models are built on PyTorch's meta device (shapes only).
"""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# benchmarks/ is a folder of scripts, not an installed package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.peers import dac_torch, unet_torch  # noqa: E402
from ldm_jax import parallel  # noqa: E402
from ldm_jax.codec import train as codec_train  # noqa: E402
from ldm_jax.config import get_config  # noqa: E402
from ldm_jax.diffusion import unet  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Intra-op threads spin against the other processes on a small shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flax_sizes_by_layer(params) -> dict:
    sizes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        top = parallel.path_str(path).split("/")[0]
        sizes[top] = sizes.get(top, 0) + math.prod(leaf.shape)
    return sizes


def _torch_sizes_by_layer(model) -> dict:
    sizes = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        top = parts[1] if parts[0] == "layers" else parts[0]
        sizes[top] = sizes.get(top, 0) + p.numel()
    return sizes


@pytest.mark.parametrize("preset,total", [("ldm_tiny", 2_545_808), ("ldm_base", 188_949_952)])
def test_unet_peer_has_the_parameters_of_ldm_jax_layer_by_layer(preset, total):
    cfg = get_config(preset)
    flax_unet = unet.make_unet(cfg.model)
    shapes = jax.eval_shape(lambda r: unet.init_variables(flax_unet, r),
                            jax.random.PRNGKey(0))["params"]
    with torch.device("meta"):
        peer = unet_torch.build_unet(cfg.model)
    assert _torch_sizes_by_layer(peer) == _flax_sizes_by_layer(shapes)
    assert unet_torch.param_count(peer) == total


def test_unet_peer_computes_the_flax_function():
    cfg = get_config("ldm_tiny")
    flax_unet = unet.make_unet(cfg.model)
    shapes = jax.eval_shape(lambda r: unet.init_variables(flax_unet, r),
                            jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(0)
    # Random values everywhere, so that the zero-initialised layers pass a signal too.
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (1.0 * parallel.path_str(path).endswith("scale")
                         + 0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    b, frames, tokens = 3, 8, 5
    x = rng.standard_normal((b, frames, 16)).astype(np.float32)
    t = np.array([0, 400, 999])
    context = rng.standard_normal((b, tokens, 128)).astype(np.float32)
    # Row 2 has every token masked: it attends to the null token alone.
    mask = np.arange(tokens)[None] < np.array([[5], [2], [0]])
    pooled = rng.standard_normal((b, 128)).astype(np.float32)
    expected, _ = jax.jit(flax_unet.apply)({"params": params}, x, t, context, mask, pooled)
    peer = unet_torch.build_unet(cfg.model)
    unet_torch.load_flax_params(peer, params)
    with torch.no_grad():
        got = peer(*(torch.from_numpy(np.asarray(a)) for a in (x, t, context, mask, pooled)))
    np.testing.assert_allclose(got.numpy(), np.asarray(expected), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of 2"):
        peer(torch.zeros(1, 7, 16), torch.zeros(1))


def test_unet_peer_train_step_updates_parameters():
    cfg = get_config("ldm_tiny")
    peer = unet_torch.build_unet(cfg.model)
    step = unet_torch.make_train_step(peer, "float32", lr=1e-3)
    batch = unet_torch.random_batch(peer, batch=2, frames=8, context_len=4, device="cpu")
    before = peer.layers["conv_out"].weight.detach().clone()
    loss = step(batch)
    assert torch.isfinite(loss)
    assert not torch.equal(before, peer.layers["conv_out"].weight)
    result = unet_torch.benchmark(cfg.model, batch=2, frames=8, context_len=4, repeats=1)
    assert result["params"] == 2_545_808
    assert result["step_s"] > 0 and result["examples_per_s"] == pytest.approx(2 / result["step_s"])


def test_dac_peer_has_the_state_dict_of_the_released_44khz_model(fixtures_dir):
    with open(os.path.join(fixtures_dir, "dac", "44khz_manifest.json")) as f:
        release = json.load(f)["configs"]["44khz"]
    with torch.device("meta"):
        gen = dac_torch.Generator()
    assert {k: list(v.shape) for k, v in gen.state_dict().items()} == \
        {e["key"]: e["shape"] for e in release["state_dict"]}
    assert sum(p.numel() for p in gen.parameters()) == release["num_parameters"]


def test_dac_peer_sizes_equal_ldm_jax_at_dac_44khz():
    cfg = get_config("codec:dac_44khz")
    state = jax.eval_shape(lambda r: codec_train.init_state(
        cfg, r, crop_samples=codec_train.crop_samples(cfg)), jax.random.key(0))
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
    with torch.device("meta"):
        gen, disc = dac_torch.build_models(cfg)
    assert sum(p.numel() for p in gen.parameters()) == size(state["params"]) == 76_651_890
    assert sum(p.numel() for p in disc.parameters()) == size(state["disc_params"])


def test_dac_peer_reproduces_dac_on_the_reference_checkpoint(fixtures_dir):
    ckpt = torch.load(os.path.join(fixtures_dir, "dac", "tiny.pth"), map_location="cpu",
                      weights_only=True)
    ref = np.load(os.path.join(fixtures_dir, "dac", "tiny_io.npz"))
    gen = dac_torch.Generator(**ckpt["metadata"]["kwargs"])
    gen.load_state_dict(ckpt["state_dict"], strict=True)
    gen.eval()
    with torch.no_grad():
        out = gen(torch.from_numpy(ref["x"]))
    np.testing.assert_array_equal(out["codes"].numpy(), ref["codes"])
    np.testing.assert_allclose(out["z"].numpy(), ref["z"], atol=1e-5)
    np.testing.assert_allclose(out["audio"].numpy(), ref["y"], atol=1e-5)
    np.testing.assert_allclose(float(out["vq/commitment_loss"]), ref["vq_commitment_loss"][0],
                               rtol=1e-4)


def test_dac_peer_train_step_updates_both_models():
    cfg = get_config("codec_tiny")
    gen, disc = dac_torch.build_models(cfg)
    step = dac_torch.make_train_step(gen, disc, cfg)
    audio = 0.1 * torch.randn(2, 1, codec_train.crop_samples(cfg),
                              generator=torch.Generator().manual_seed(0))
    g_before = gen.decoder.model[0].weight_v.detach().clone()
    d_before = disc.discriminators[0].conv_post.weight_v.detach().clone()
    out = step(audio)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["disc/loss"])
    assert not torch.equal(g_before, gen.decoder.model[0].weight_v)
    assert not torch.equal(d_before, disc.discriminators[0].conv_post.weight_v)
    result = dac_torch.benchmark(cfg, batch=2, repeats=1)
    assert result["params"] == 148_698 and result["samples"] == 4000
    with pytest.raises(ValueError, match="dac_rvq"):
        dac_torch.build_models(get_config("codec_tiny:vae"))

