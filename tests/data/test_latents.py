"""The latents builder: contents, statistics, resume, host parts, KL means."""

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.codec import inference
from ldm_jax.codec import latents as latents_writer
from ldm_jax.codec.model import CodecConfig, make_codec
from ldm_jax.codec.quantize import STATS
from ldm_jax.data import builders, latents
from ldm_jax.data.tfds_common import DataError

SR = 16000


def random_codec_params(config, seed=0):
    """Random codec variables from the parameter shapes alone: no initialiser is compiled."""
    codec = make_codec(config)
    x = jnp.zeros((1, config.hop_length, config.channels))
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(codec.init({"params": r}, x)),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name in ("alpha", "weight_g"):
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(size=leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def write_tiny_codec(directory, quantizer="dac_rvq", seed=0):
    config = CodecConfig(sample_rate=SR, channels=1, encoder_dim=4, encoder_rates=(2, 4, 4, 5),
                         latent_dim=8, decoder_dim=16, decoder_rates=(5, 4, 4, 2), n_codebooks=2,
                         codebook_size=16, codebook_dim=4, quantizer=quantizer)
    variables = random_codec_params(config, seed)
    inference.write_checkpoint(str(directory), config, variables["params"],
                               variables.get(STATS))
    return str(directory)


def data_cfg():
    return ml_collections.ConfigDict(dict(name="synthetic_music", sample_rate=SR, channels=1,
                                          clip_seconds=0.5, num_train=4, num_test=2, seed=0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # One LoadedCodec (and its compiled encoder) per checkpoint for the whole module.
    cache, load = {}, inference.load_trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "load_trained",
                   lambda path, **kw: cache.setdefault(path, load(path, **kw)))
        yield build_setup(tmp_path_factory)


def build_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    data_dir = str(root / "data")
    builders.build("synthetic_music", data_cfg(), data_dir, workers=1, progress=False)
    codec = write_tiny_codec(root / "codec")
    out = str(root / "latents")
    summary = latents_writer.encode_latents(codec, data_cfg(), data_dir, out, batch_size=3,
                                     progress=False)
    return root, data_dir, codec, out, summary


def codec_latents(loaded, audio, key):
    """What the builder stores: the clip zero-padded to whole frame buckets, cut to its frames."""
    bucket = loaded.config.hop_length * latents_writer.LENGTH_BUCKET_FRAMES
    x = np.zeros((1, -(-len(audio) // bucket) * bucket, 1), np.float32)
    x[0, :len(audio), 0] = audio
    return loaded.encode(x)[key][0, :-(-len(audio) // loaded.config.hop_length)]


def by_index(out, split):
    return {int(e["source_index"]): e for e in builders.open_split(out, "latents", split)}


def test_latents_hold_codec_z_captions_and_attributes(setup):
    _, data_dir, codec, out, summary = setup
    assert summary["splits"] == {"train": 4, "test": 2} and summary["latent"] == "z"
    assert summary["complete"] and not summary["already_built"]
    assert latents.is_complete(out)
    assert not os.path.exists(os.path.join(out, latents_writer.PARTS_DIR))
    loaded = inference.load_trained(codec)
    for split in ("train", "test"):
        source = builders.open_split(data_dir, "synthetic_music", split)
        stored = by_index(out, split)
        assert sorted(stored) == list(range(len(source)))
        for i, example in stored.items():
            original = source[i]
            z = codec_latents(loaded, original["audio"], "z")
            assert example["latents"].dtype == np.float32 and example["latents"].shape == (50, 8)
            np.testing.assert_allclose(example["latents"], z, rtol=1e-5, atol=1e-5)
            for key in ("caption", "instrument", "key", "mode", "loudness", "pattern", "id"):
                assert example[key] == original[key]
            assert example["tempo_bpm"] == original["tempo_bpm"]
            assert example["loudness_db"] == original["loudness_db"]


def test_statistics_match_the_training_latents(setup):
    _, _, _, out, summary = setup
    z = np.concatenate([e["latents"] for e in by_index(out, "train").values()])
    stats = latents.read_stats(out)
    np.testing.assert_allclose(stats.mean, z.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.std, z.std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.scale_factor, 1 / z.std(), rtol=1e-4)
    assert summary["scale_factor"] == pytest.approx(stats.scale_factor)
    assert stats.num_frames == 200 and stats.frame_rate == 100.0 and stats.latent_dim == 8
    normalised = stats.normalize(z, "channel")
    np.testing.assert_allclose(normalised.std(0), 1.0, rtol=1e-3)
    np.testing.assert_allclose(stats.denormalize(stats.normalize(z)), z, rtol=1e-5, atol=1e-6)
    info = builders.dataset_info(out, "latents")
    assert info["features"]["latents"] == "float32[None, 8]"
    meta = json.load(open(os.path.join(info["path"], "metadata.json")))
    assert meta["stats"]["scale_factor"] == pytest.approx(stats.scale_factor)


def test_complete_dataset_is_skipped_quickly(setup, monkeypatch):
    _, data_dir, codec, out, _ = setup
    monkeypatch.setattr(inference, "load_trained",
                        lambda *a, **k: pytest.fail("a complete dataset must not load the codec"))
    begin = time.perf_counter()
    again = latents_writer.encode_latents(codec, data_cfg(), data_dir, out, progress=False)
    assert again["already_built"] and again["complete"]
    assert time.perf_counter() - begin < 30


def test_host_parts_join_into_the_same_dataset_and_resume(setup, tmp_path, monkeypatch):
    _, data_dir, codec, out, _ = setup
    two = str(tmp_path / "two")
    first = latents_writer.encode_latents(codec, data_cfg(), data_dir, two, progress=False,
                                   process_index=1, process_count=2)
    assert not first["complete"] and not latents.is_complete(two)  # process 0 has not run
    parts = sorted(os.listdir(os.path.join(two, latents_writer.PARTS_DIR)))
    assert parts == ["test-00001-of-00002", "train-00001-of-00002"]
    encode_part, encoded = latents_writer._encode_part, []

    def interrupted(part, **kw):
        if kw["split"] == "test":
            raise KeyboardInterrupt
        encoded.append(kw["split"])
        encode_part(part, **kw)

    monkeypatch.setattr(latents_writer, "_encode_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        latents_writer.encode_latents(codec, data_cfg(), data_dir, two, progress=False,
                               process_index=0, process_count=2)

    def resumed(part, **kw):
        encoded.append(kw["split"])
        encode_part(part, **kw)

    monkeypatch.setattr(latents_writer, "_encode_part", resumed)
    latents_writer.encode_latents(codec, data_cfg(), data_dir, two, progress=False, process_index=0,
                           process_count=2)
    assert encoded == ["train", "test"]  # the finished train part was not encoded again
    joined = {s: by_index(two, s) for s in ("train", "test")}
    single = {s: by_index(out, s) for s in ("train", "test")}
    for split in ("train", "test"):
        assert sorted(joined[split]) == sorted(single[split])
        for i in single[split]:
            np.testing.assert_array_equal(joined[split][i]["latents"], single[split][i]["latents"])
    a, b = latents.read_stats(two), latents.read_stats(out)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6)
    assert a.scale_factor == pytest.approx(b.scale_factor, rel=1e-6)
    info = builders.dataset_info(two, "latents")
    assert info["splits"] == {"train": 4, "test": 2}


def test_kl_codec_stores_the_posterior_mean_and_other_codec_is_refused(setup, tmp_path):
    _, data_dir, _, out, _ = setup
    codec = write_tiny_codec(tmp_path / "vae", quantizer="kl")
    summary = latents_writer.encode_latents(codec, data_cfg(), data_dir, str(tmp_path / "kl"),
                                     progress=False)
    assert summary["latent"] == "mean"
    loaded = inference.load_trained(codec)
    source = builders.open_split(data_dir, "synthetic_music", "test")
    example = by_index(str(tmp_path / "kl"), "test")[0]
    mean = codec_latents(loaded, source[0]["audio"], "mean")
    # Batched against alone: float32 convolutions sum in another order (values up to ~12).
    np.testing.assert_allclose(example["latents"], mean, rtol=1e-5, atol=1e-4)
    with pytest.raises(DataError, match="overwrite"):
        latents_writer.encode_latents(codec, data_cfg(), data_dir, out, progress=False)
