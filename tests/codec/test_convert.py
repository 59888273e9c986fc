"""DAC checkpoint import: parity with the PyTorch reference outputs; the restricted unpickler."""

import functools
import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.codec import Codec, import_dac, load, make_codec
from ldm_jax.codec.model import PRESETS
from ldm_jax.codec.pickle_io import CheckpointError, UnsafeCheckpointError, load_pth
from ldm_jax.config import ConfigError

TOL = 1e-4


def _ncw_to_nwc(a):
    return jnp.asarray(a).transpose(0, 2, 1)


def _nwc_to_ncw(a):
    return np.asarray(a).transpose(0, 2, 1)


@pytest.fixture(scope="module")
def dac(fixtures_dir):
    path = os.path.join(fixtures_dir, "dac", "tiny.pth")
    config, params = import_dac(path)
    codec = make_codec(config)
    variables = {"params": params}
    ref = dict(np.load(os.path.join(fixtures_dir, "dac", "tiny_io.npz")))
    encode = jax.jit(functools.partial(codec.apply, variables, method=Codec.encode))
    decode = jax.jit(functools.partial(codec.apply, variables, method=Codec.decode))
    # The bottleneck alone, to try other codebook counts without compiling the encoder again.
    quantize = jax.jit(lambda z_e, n: codec.apply(
        variables, z_e, method=lambda m, z: m.quantizer(z, n_quantizers=n)), static_argnums=1)
    from_codes = jax.jit(lambda c: codec.apply(
        variables, c, method=lambda m, c: m.quantizer.from_codes(c)))
    from_latents = jax.jit(lambda l: codec.apply(
        variables, l, method=lambda m, l: m.quantizer.from_latents(l)))
    return dict(path=path, config=config, codec=codec, variables=variables, ref=ref,
                encode=encode, decode=decode, quantize=quantize, from_codes=from_codes,
                from_latents=from_latents)


def _close(ours, ref_ncw):
    ours = _nwc_to_ncw(ours)
    assert ours.shape == ref_ncw.shape
    assert float(np.max(np.abs(ours - ref_ncw))) <= TOL


def test_config_from_metadata(dac):
    assert dac["config"]["encoder_rates"] == [2, 4, 5]
    assert dac["config"]["quantizer"] == "dac_rvq" and dac["config"]["quantizer_dropout"] == 0.0
    tiny = PRESETS["dac_16khz_tiny"].to_dict()
    assert {k: v for k, v in dac["config"].items() if k != "quantizer_dropout"} == {
        k: v for k, v in tiny.items() if k != "quantizer_dropout"}
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(dac["variables"]))
    assert n == 437_902


def test_encode_parity(dac):
    ref = dac["ref"]
    z, aux = dac["encode"](_ncw_to_nwc(ref["x"]))
    np.testing.assert_array_equal(_nwc_to_ncw(aux["codes"]), ref["codes"])
    _close(aux["z_e"], ref["z_e"])
    _close(z, ref["z"])
    _close(aux["latents"], ref["latents"])
    np.testing.assert_allclose(aux["losses"]["vq/commitment_loss"], ref["vq_commitment_loss"][0],
                               atol=TOL)
    np.testing.assert_allclose(aux["losses"]["vq/codebook_loss"], ref["vq_codebook_loss"][0],
                               atol=TOL)


def test_encode_parity_two_codebooks(dac):
    ref = dac["ref"]
    _, aux_all = dac["encode"](_ncw_to_nwc(ref["x"]))
    z, aux = dac["quantize"](aux_all["z_e"], 2)
    np.testing.assert_array_equal(_nwc_to_ncw(aux["codes"]), ref["codes_nq2"])
    _close(z, ref["z_nq2"])
    _close(aux["latents"], ref["latents_nq2"])
    _close(dac["decode"](_ncw_to_nwc(ref["z_nq2"])), ref["y_nq2"])


def test_decode_parity(dac):
    ref = dac["ref"]
    y = dac["decode"](_ncw_to_nwc(ref["z"]))
    assert y.shape == (1, 7992, 1)  # stride 5 upsampling gives 5L - 1, as in PyTorch
    _close(y, ref["y"])
    _close(y, ref["forward_audio"])


def test_codes_and_latents_parity(dac):
    ref = dac["ref"]
    z, raw = dac["from_codes"](_ncw_to_nwc(ref["codes"]).astype(jnp.int32))
    _close(z, ref["z_from_codes"])
    _close(raw, ref["zp_from_codes"])
    z, _, codes_l = dac["from_latents"](_ncw_to_nwc(ref["latents"]))
    _close(z, ref["z_from_latents"])
    np.testing.assert_array_equal(_nwc_to_ncw(codes_l), ref["codes_from_latents"])


def test_load_entry_point(dac):
    codec, variables = load(dac["path"])
    assert codec.config == dac["codec"].config
    assert set(variables) == {"params"}
    with pytest.raises(ConfigError, match="presets"):
        load("no_such_codec")


def _zip_with_pickle(path, payload: bytes, extra=()):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        for name, data in extra:
            z.writestr(name, data)


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"),
                                         ("builtins", "eval")])
def test_malicious_pickle_is_refused_without_side_effect(malicious_checkpoint, module, name):
    path, payload, marker = malicious_checkpoint("evil.pth", module, name)
    expected = (f"refusing to load evil.pth: it contains object {module}.{name}; only tensors "
                "and plain containers are allowed")
    with pytest.raises(UnsafeCheckpointError) as info:
        import_dac(path)
    assert str(info.value) == expected
    with pytest.raises(UnsafeCheckpointError):
        load_pth(path)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler would have run it (checked for builtins
    # only, whose effect is contained to the temporary directory).
    if name == "eval":
        pickle.loads(payload)
        assert marker.exists()


def test_damaged_and_foreign_files(tmp_path, dac):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="zip"):
        import_dac(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        import_dac(tmp_path / "missing.pth")
    plain = tmp_path / "plain.pth"
    _zip_with_pickle(plain, pickle.dumps({"a": [1, 2.0, "x"]}, protocol=2))
    assert load_pth(plain) == {"a": [1, 2.0, "x"]}
    with pytest.raises(CheckpointError, match="not a DAC checkpoint"):
        import_dac(plain)
    # A storage that is missing from the archive.
    with zipfile.ZipFile(dac["path"]) as z:
        entries = [(n, z.read(n)) for n in z.namelist() if not n.endswith("data/0")]
    damaged = tmp_path / "damaged.pth"
    with zipfile.ZipFile(damaged, "w") as z:
        for n, data in entries:
            z.writestr(n, data)
    with pytest.raises(CheckpointError, match="damaged"):
        import_dac(damaged)


def test_metadata_mismatch_is_reported(tmp_path, dac):
    with zipfile.ZipFile(dac["path"]) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl_name = next(n for n in entries if n.endswith("data.pkl"))
    data = entries[pkl_name]
    at = data.index(b"n_codebooks")
    at = data.index(b"K\x04", at)  # BININT1 4 right after the key
    entries[pkl_name] = data[:at] + b"K\x03" + data[at + 2:]
    path = tmp_path / "three.pth"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in entries.items():
            z.writestr(n, d)
    with pytest.raises(CheckpointError, match="quantizer.quantizers.3"):
        import_dac(path)


def test_tensor_rebuild_strided_and_bounds(tmp_path):
    """Tensors are views (offset, stride) into storages; out-of-range views are refused."""

    def payload(size, stride, offset):
        # ('storage', torch.FloatStorage, '0', 'cpu', 6) via BINPERSID, then _rebuild_tensor_v2.
        buf = io.BytesIO()
        buf.write(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(")
        buf.write(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
                  b"X\x03\x00\x00\x00cpuK\x06tQ")
        buf.write(b"K" + bytes([offset]))
        buf.write(b"(" + b"".join(b"K" + bytes([s]) for s in size) + b"t")
        buf.write(b"(" + b"".join(b"K" + bytes([s]) for s in stride) + b"t")
        buf.write(b"\x89ccollections\nOrderedDict\n)RtR.")
        return buf.getvalue()

    storage = np.arange(6, dtype="<f4").tobytes()
    good = tmp_path / "t.pth"
    _zip_with_pickle(good, payload((2, 2), (1, 2), 1), [("archive/data/0", storage)])
    np.testing.assert_array_equal(load_pth(good), np.array([[1.0, 3.0], [2.0, 4.0]]))
    bad = tmp_path / "bad.pth"
    _zip_with_pickle(bad, payload((3, 3), (3, 1), 0), [("archive/data/0", storage)])
    with pytest.raises(CheckpointError, match="damaged"):
        load_pth(bad)
