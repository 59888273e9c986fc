"""EnCodec checkpoint import: parity with the PyTorch reference on the tiny fixture, key coverage
of the released 24 and 48 kHz layouts, volume normalisation, and refusal of bad files.

The released models' manifests hold shapes only: their numerics (notably the 48 kHz model's
GroupNorm, non-causal padding and normalisation) are not compared with PyTorch here.
"""

import dataclasses
import functools
import json
import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import traverse_util

from ldm_jax import cli, parallel
from ldm_jax.codec import Codec, CodecConfig, CodecError, import_encodec, load, make_codec
from ldm_jax.codec import encodec_import as ei
from ldm_jax.codec.model import init_variables, normalize_volume
from ldm_jax.codec.pickle_io import CheckpointError, UnsafeCheckpointError, load_pth
from ldm_jax.codec.quantize import STATS
from ldm_jax.config import ConfigError

TOL = 1e-4  # max abs difference allowed against PyTorch (measured: ~2e-7 latents, ~4e-7 audio)
RNG = jax.random.key(0, impl="rbg")


def _ncw(a):
    return np.asarray(a).transpose(0, 2, 1)


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    folder = os.path.join(fixtures_dir, "encodec")
    path, config_path = os.path.join(folder, "tiny.pth"), os.path.join(folder, "tiny_config.json")
    config, params, stats = import_encodec(path, config_path)
    codec = make_codec(config)
    variables = {"params": params, STATS: stats}
    ref = dict(np.load(os.path.join(folder, "tiny_io.npz")))
    encode = jax.jit(functools.partial(codec.apply, variables, method=Codec.encode))
    decode_codes = jax.jit(functools.partial(codec.apply, variables, method=Codec.decode_codes))
    # The bottleneck alone, to try fewer codebooks without compiling the encoder again.
    quantize = jax.jit(lambda z_e, n: codec.apply(
        variables, z_e, method=lambda m, z: m.quantizer(z, n_quantizers=n)), static_argnums=1)
    z, aux = encode(jnp.asarray(_ncw(ref["x"])))
    return dict(folder=folder, path=path, config_path=config_path, config=config, codec=codec,
                variables=variables, ref=ref, encode=encode, decode_codes=decode_codes,
                quantize=quantize, z=z, aux=aux)


def _max_diff(ours_nwc, ref_ncw):
    ours = _ncw(ours_nwc)
    assert ours.shape == ref_ncw.shape
    return float(np.max(np.abs(ours - ref_ncw)))


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_tiny_config_layout_and_counts(tiny):
    config = CodecConfig.from_dict(tiny["config"])
    assert config.architecture == "seanet" and config.quantizer == "ema_rvq" and config.causal
    assert config.encoder_rates == (2, 4, 5) and config.decoder_rates == (5, 4, 2)
    assert config.hop_length == 40 and config.frame_rate == 400
    # EnCodec's 63,358 parameters; its buffers less the 4 `inited` flags are our EMA state.
    assert _count(tiny["variables"]["params"]) == 63_358
    assert _count(tiny["variables"][STATS]) == 16_644 - 4
    # The shapes alone show the architecture the constructor arguments describe.
    layout = ei.detect_layout(load_pth(tiny["path"]))
    assert layout == ei._signature(config)


def test_encode_parity(tiny):
    ref, aux = tiny["ref"], tiny["aux"]
    np.testing.assert_array_equal(_ncw(aux["codes"]), ref["codes"])
    assert _max_diff(aux["z_e"], ref["emb"]) <= TOL
    assert _max_diff(tiny["z"], ref["quantized"]) <= TOL


def test_decode_parity(tiny):
    ref = tiny["ref"]
    y = tiny["decode_codes"](jnp.asarray(_ncw(ref["codes"]), jnp.int32))
    assert y.shape == (1, 8000, 1)
    assert _max_diff(y, ref["y_decode"]) <= TOL
    assert _max_diff(y, ref["y"]) <= TOL  # EnCodec's forward: encode, decode, cut to length


def test_bandwidth_selects_codebooks_as_encodec(tiny):
    config, ref = CodecConfig.from_dict(tiny["config"]), tiny["ref"]
    assert config.n_codebooks_for_bandwidth(5.0) == 2
    assert config.n_codebooks_for_bandwidth(10.0) == 4
    with pytest.raises(CodecError, match="5, 10 kbps"):
        config.n_codebooks_for_bandwidth(6.0)
    z, aux = tiny["quantize"](tiny["aux"]["z_e"], 2)
    np.testing.assert_array_equal(_ncw(aux["codes"]), ref["codes_bw5"])
    assert _max_diff(z, ref["quantized_bw5"]) <= TOL
    y = tiny["decode_codes"](jnp.asarray(_ncw(ref["codes_bw5"]), jnp.int32))
    assert _max_diff(y, ref["y_decode_bw5"]) <= TOL


@pytest.mark.parametrize("release,bandwidth_codebooks", [
    ("24khz", {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}),
    ("48khz", {3.0: 2, 6.0: 4, 12.0: 8, 24.0: 16}),
])
def test_release_layout_covers_every_key(fixtures_dir, release, bandwidth_codebooks):
    with open(os.path.join(fixtures_dir, "encodec", f"{release}_manifest.json")) as f:
        manifest = json.load(f)
    # Zero-stride arrays: the shapes of the 23M values without their memory.
    state_dict = {e["key"]: np.broadcast_to(np.float32(e["key"].endswith("inited")),
                                            e["shape"]) for e in manifest["state_dict"]}
    name, config = ei.config_from_state_dict(state_dict, f"{release}.th")
    want = manifest["config"]
    assert name == f"encodec_{release}"
    assert (config.sample_rate, config.channels, config.causal, config.seanet_norm,
            config.normalize) == (want["sample_rate"], want["channels"], want["causal"],
                                  want["norm"], want["normalize"])
    assert config.segment_seconds == (want["segment"] or 0.0)
    assert config.segment_overlap == want["overlap"]
    assert list(config.decoder_rates) == want["decoder_ratios"]
    assert (config.hop_length, config.frame_rate) == (want["hop_length"], want["frame_rate"])
    assert (config.n_codebooks, config.codebook_size, config.latent_dim) == (
        want["n_q"], want["bins"], want["dimension"])
    assert list(config.target_bandwidths) == want["target_bandwidths"]
    assert {b: config.n_codebooks_for_bandwidth(b) for b in config.target_bandwidths} == \
        bandwidth_codebooks
    # Every key lands on a variable of its shape and every variable is filled (checked inside).
    params, stats = ei.convert_encodec_state_dict(state_dict, config, f"{release}.th")
    expected = ei.expected_variables(config)
    for ours, theirs in ((params, expected["params"]), (stats, expected[STATS])):
        assert jax.tree.map(np.shape, ours) == jax.tree.map(lambda x: tuple(x.shape), theirs)
    assert _count(params) == manifest["num_parameters"]
    assert _count(stats) == manifest["num_buffer_elements"] - config.n_codebooks
    # A tensor too many or too few is named.
    with pytest.raises(CheckpointError, match="encoder.model.99.lstm.weight_ih_l0"):
        ei.convert_encodec_state_dict({**state_dict,
                                       "encoder.model.99.lstm.weight_ih_l0": np.zeros(1)},
                                      config)
    missing = dict(state_dict)
    missing.pop("decoder.model.1.lstm.bias_hh_l1")
    with pytest.raises(CheckpointError, match="decoder/lstm/layer_1_bias_hh"):
        ei.convert_encodec_state_dict(missing, config)


def test_normalize_volume_is_encodecs_formula():
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal((2, 4800, 2))).astype(np.float32)
    x[1] *= 0.01
    y, scale = normalize_volume(jnp.asarray(x))
    mono = x.astype(np.float64).mean(axis=2)
    want = np.sqrt(np.mean(mono ** 2, axis=1)) + 1e-8
    np.testing.assert_allclose(np.asarray(scale), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y) * want[:, None, None], x, rtol=1e-5, atol=1e-8)
    y, scale = normalize_volume(jnp.zeros((1, 100, 2)))
    assert float(scale[0]) == pytest.approx(1e-8) and not np.any(np.isnan(np.asarray(y)))


def _stereo_config(**overrides):
    """The 48 kHz layout (stereo, non-causal, GroupNorm, normalised) at the tiny fixture's size."""
    seanet = dict(channels=2, dimension=16, n_filters=4, ratios=[4, 2], norm="time_group_norm",
                  causal=False)
    kwargs = {"seanet_encoder": seanet, "seanet_decoder": seanet,
              "quantizer": dict(dimension=16, n_q=3, bins=32),
              "model": dict(target_bandwidths=[1.0], sample_rate=8000, channels=2,
                            normalize=True, segment=1.0)}
    return ei.config_from_encodec_kwargs(kwargs)


def _numpy_variables(codec, seed=0):
    """Random variables of the codec's shapes, drawn with numpy: compiling the initialiser takes
    seconds on a loaded CPU."""
    shapes = ei.expected_variables(codec.config)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.0, s.shape)
                                              * rng.choice([-1, 1], s.shape), s.dtype), shapes)


def test_normalising_codec_round_trips_the_scale():
    codec = make_codec(_stereo_config())
    variables = _numpy_variables(codec)
    rng = np.random.default_rng(1)
    x = jnp.asarray(0.1 * rng.standard_normal((1, 203, 2)), jnp.float32)
    xs = jnp.concatenate([x, 3.0 * x])  # the same clip, louder

    @jax.jit
    def run(v, x):
        y, aux = codec.apply(v, x)
        return y, aux, codec.apply(v, aux["z"], method=Codec.decode)

    y, aux, unscaled = run(variables, xs)
    assert y.shape == xs.shape  # non-causal reflect padding, 203 is not a multiple of the hop
    _, want = normalize_volume(x)
    np.testing.assert_allclose(np.asarray(aux["scale"]), [want[0], 3 * want[0]], rtol=1e-5)
    # What is encoded is the normalised clip: the same codes, and the decoded audio is scaled
    # back to each input's volume.
    np.testing.assert_array_equal(aux["codes"][0], aux["codes"][1])
    np.testing.assert_allclose(np.asarray(y[1]), 3 * np.asarray(y[0]), rtol=1e-4, atol=1e-6)
    scale = np.asarray(aux["scale"])[:, None, None]
    np.testing.assert_allclose(np.asarray(unscaled[:, :203]) * scale, np.asarray(y), rtol=1e-5,
                               atol=1e-7)


def test_every_variable_is_named():
    for config in (_stereo_config(), ei.config_from_encodec_kwargs(ei.RELEASES["encodec_24khz"])):
        boxed = jax.eval_shape(functools.partial(init_variables, make_codec(config), boxed=True),
                               RNG)
        leaves = jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
        unnamed = [parallel.path_str(p) for p, leaf in leaves
                   if not isinstance(leaf, nn.Partitioned)]
        assert not unnamed, unnamed
        names = {n for _, leaf in leaves for n in leaf.names if n is not None}
        assert names <= set(parallel.LOGICAL_RULES)
    flat = traverse_util.flatten_dict(nn.unbox(boxed["params"]), sep="/")
    assert flat["encoder/lstm/layer_0_kernel_ih"].shape == (512, 2048)
    assert flat["decoder/block_0_up/conv/weight_v"].shape == (16, 512, 256)


def test_config_validation_is_one_line():
    with pytest.raises(ConfigError, match="time_group_norm.*cannot be causal"):
        CodecConfig(architecture="seanet", seanet_norm="time_group_norm", causal=True)
    with pytest.raises(ConfigError, match="architecture='wavenet' is unknown"):
        CodecConfig(architecture="wavenet")
    with pytest.raises(ConfigError, match="seanet_trim_right_ratio"):
        CodecConfig(architecture="seanet", seanet_trim_right_ratio=0.5)
    with pytest.raises(ConfigError, match="segment_overlap"):
        CodecConfig(segment_overlap=1.0)


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval")])
def test_malicious_pickle_is_refused_without_side_effect(malicious_checkpoint, module, name):
    path, payload, marker = malicious_checkpoint("evil.th", module, name)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load evil.th: it contains "
                                                     f"object {module}.{name}"):
        import_encodec(path)
    assert not marker.exists()
    if name == "eval":  # the payload is live: an unrestricted unpickler runs it
        pickle.loads(payload)
        assert marker.exists()


def test_bad_files_and_configs(tmp_path, tiny, fixtures_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        import_encodec(tmp_path / "missing.th")
    text = tmp_path / "notes.th"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="zip"):
        import_encodec(text)
    with pytest.raises(CheckpointError, match="not an EnCodec checkpoint"):
        import_encodec(os.path.join(fixtures_dir, "dac", "tiny.pth"))
    # The tiny model is no release: its sample rate and causality are not in the weights.
    with pytest.raises(CheckpointError, match=r"not a released model \(1 channel\(s\), "
                                              r"weight_norm.*pass --config JSON"):
        import_encodec(tiny["path"])
    with pytest.raises(CheckpointError, match="tiny.pth does not match 24k.json"):
        path = tmp_path / "24k.json"
        path.write_text(json.dumps(ei.RELEASES["encodec_24khz"]))
        import_encodec(tiny["path"], path)
    with pytest.raises(CheckpointError, match="model has arguments EnCodec 0.1.1 does not take"):
        import_encodec(tiny["path"], {**ei.RELEASES["encodec_24khz"],
                                      "model": {"bandwidths": [1.0]}})
    with pytest.raises(CheckpointError, match="not JSON"):
        import_encodec(tiny["path"], text)
    state_dict = load_pth(tiny["path"])
    state_dict["quantizer.vq.layers.2._codebook.inited"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError, match="layers.2._codebook was never initialised"):
        ei.convert_encodec_state_dict(state_dict, CodecConfig.from_dict(tiny["config"]))
    # `load` takes EnCodec files by their `.th` suffix; only releases need no config.
    renamed = tmp_path / "tiny.th"
    renamed.write_bytes(open(tiny["path"], "rb").read())
    with pytest.raises(CheckpointError, match="not a released model"):
        load(str(renamed))


def test_cli_import_encode_decode(tiny, tmp_path, capsys):
    out = str(tmp_path / "encodec")
    assert cli.main(["codec", "import-encodec", tiny["path"], "--out", out,
                     "--config", tiny["config_path"]]) == 0
    assert "EnCodec codec at 16000 Hz" in capsys.readouterr().out
    ref = tiny["ref"]
    wav = str(tmp_path / "x.wav")
    sf.write(wav, ref["x"][0, 0], 16000, subtype="FLOAT")
    codes = str(tmp_path / "codes.npz")
    assert cli.main(["codec", "encode", wav, "-o", codes, "--codec", out]) == 0
    np.testing.assert_array_equal(np.load(codes)["codes"], ref["codes"][0].T)
    y = str(tmp_path / "y.wav")
    assert cli.main(["codec", "decode", codes, "-o", y, "--codec", out]) == 0
    audio, sr = sf.read(y, dtype="float32")
    assert sr == 16000
    np.testing.assert_allclose(audio, ref["y_decode"][0, 0], atol=2e-4)  # 16-bit WAV
    low = str(tmp_path / "low.npz")
    assert cli.main(["codec", "encode", wav, "-o", low, "--codec", out, "--bandwidth", "5"]) == 0
    np.testing.assert_array_equal(np.load(low)["codes"], ref["codes_bw5"][0].T)
    capsys.readouterr()
    # The imported directory loads like any trained codec.
    codec, variables = load(out)
    assert codec.config == make_codec(tiny["config"]).config and set(variables) == {"params",
                                                                                    STATS}
    for argv, message in (
            (["codec", "import-encodec", str(tmp_path / "none.th"), "--out", out],
             "does not exist"),
            (["codec", "import-encodec", tiny["path"], "--out", out], "pass --config JSON"),
            (["codec", "encode", wav, "-o", low, "--codec", out, "--bandwidth", "6"],
             "trained for the bandwidths 5, 10 kbps")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_exact_straight_through_keeps_the_codebook_vector():
    from ldm_jax.codec.quantize import straight_through_exact
    x = jnp.asarray([0.1, 1e-3, 7.3], jnp.float32)
    q = jnp.asarray([0.3, -2.7e-5, 7.0], jnp.float32)
    np.testing.assert_array_equal(straight_through_exact(x, q), q)  # bit for bit
    grad = jax.grad(lambda x: jnp.sum(2.0 * straight_through_exact(x, q)))(x)
    np.testing.assert_array_equal(grad, 2.0 * np.ones(3))


def test_segments_and_overlap_add_are_encodecs():
    from ldm_jax.codec.inference import linear_overlap_add, segment_bounds
    assert segment_bounds(1000, 400, 360) == [(0, 400), (360, 400), (720, 280)]
    assert segment_bounds(300, 400, 360) == [(0, 300)]
    one = np.arange(12, dtype=np.float32).reshape(1, 6, 2)
    np.testing.assert_allclose(linear_overlap_add([one], 4), one, rtol=1e-6)  # w x / w
    a, b = np.ones((1, 6, 1), np.float32), 3 * np.ones((1, 5, 1), np.float32)
    y = linear_overlap_add([a, b], 4)[0, :, 0]
    # Triangle weights w = 0.5 - |t - 0.5| on t = linspace(0, 1, 8)[1:-1]: samples 0-3 are the
    # first segment's alone, 4 and 5 blend by the weights, 6-8 are the second's alone.
    w = 0.5 - np.abs(np.linspace(0, 1, 8)[1:-1] - 0.5)
    want = [1, 1, 1, 1, (w[4] + 3 * w[0]) / (w[4] + w[0]), (w[5] + 3 * w[1]) / (w[5] + w[1]),
            3, 3, 3]
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_cli_segmented_normalising_codec(tmp_path, capsys):
    from ldm_jax.codec import inference
    config = dataclasses.replace(_stereo_config(), segment_seconds=0.05, segment_overlap=0.1)
    codec = make_codec(config)
    variables = _numpy_variables(codec)
    out = str(tmp_path / "stereo")
    inference.write_checkpoint(out, config, variables["params"], variables[STATS])
    rng = np.random.default_rng(2)
    x = (0.1 * rng.standard_normal((1000, 2))).astype(np.float32)
    x[500:] *= 4.0  # louder from the middle: the segments get different scales
    wav, codes, y = (str(tmp_path / n) for n in ("x.wav", "codes.npz", "y.wav"))
    sf.write(wav, x, 8000, subtype="FLOAT")
    assert cli.main(["codec", "encode", wav, "-o", codes, "--codec", out]) == 0
    data = np.load(codes)
    # 400-sample segments every 360 samples, 8 samples per frame.
    np.testing.assert_array_equal(data["segment_frames"], [50, 50, 35])
    assert data["codes"].shape == (135, 3)
    want = [float(normalize_volume(jnp.asarray(x[None, o:o + n]))[1][0])
            for o, n in ((0, 400), (360, 400), (720, 280))]
    np.testing.assert_allclose(data["scale"], want, rtol=1e-5)
    assert cli.main(["codec", "decode", codes, "-o", y, "--codec", out]) == 0
    audio, sr = sf.read(y, dtype="float32")
    assert sr == 8000 and audio.shape == (1000, 2)
    capsys.readouterr()


def test_padding_rules_are_encodecs():
    from ldm_jax.codec.seanet import conv_padding, pad1d, transpose_trim
    # Fixed padding K - stride (K the dilated kernel), plus what fills the last window.
    assert conv_padding(203, 8, 4, causal=True) == (4, 1)
    assert conv_padding(203, 8, 4) == (2, 3)
    assert conv_padding(10, 3, 1, dilation=4) == (4, 4)
    assert conv_padding(10, 7, causal=True) == (6, 0)
    x = jnp.asarray([1.0, 2.0, 3.0])[None, :, None]
    np.testing.assert_array_equal(pad1d(x, 1, 2)[0, :, 0], [2, 1, 2, 3, 2, 1])
    # Shorter than the padding: zeros appended, reflected, then cut off again.
    np.testing.assert_array_equal(pad1d(x, 6, 0)[0, :, 0], [0, 0, 0, 0, 3, 2, 1, 2, 3])
    np.testing.assert_array_equal(pad1d(x, 2, 1, "constant")[0, :, 0], [0, 0, 1, 2, 3, 0])
    assert transpose_trim(10, 5, causal=True) == (0, 5)
    assert transpose_trim(10, 5, causal=True, trim_right_ratio=0.5) == (2, 3)
    assert transpose_trim(10, 5) == (3, 2)
