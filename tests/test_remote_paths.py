"""Remote (gs://) workdirs and data dirs, on a fake Cloud Storage.

Tests have no network. Without TensorFlow, etils.epath reaches gs:// through the fsspec
filesystem registered for the `gcs` protocol (gcsfs in real use); here `FakeGcs` takes that
place and maps gs://bucket/key onto a local directory with an object store's rules: an object
appears whole when its write closes, nothing can be appended to, and a directory exists only while
objects lie under it. Orbax writes arrays through tensorstore's own Cloud Storage driver, which no
fsspec filesystem stands in for, so where a test trains, orbax alone writes straight into the
fake's backing directory.
"""

import importlib
import io
import json
import os
import types

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.spec import AbstractFileSystem

from ldm_jax import chain, cli, loop, paths
from ldm_jax import config as config_lib
from ldm_jax.audio import io as audio_io
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.clap.text import Tokenizer
from ldm_jax.codec import inference
from ldm_jax.codec import latents as codec_latents
from ldm_jax.codec.model import CodecConfig, make_codec
from ldm_jax.codec.quantize import STATS
from ldm_jax.data import DataError, builders, latents
from ldm_jax.eval import report

W = "gs://bucket/run"


class FakeGcs(AbstractFileSystem):
    """gs://bucket/key -> ROOT/bucket/key, with an object store's rules; logs reads and writes."""

    protocol = ("gs", "gcs")
    cachable = False
    root = ""
    log: list = []

    def __init__(self, *args, **kwargs):  # gcsfs options such as finalize_on_close
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.rstrip("/")

    def _local(self, path):
        key = self._strip_protocol(path)
        assert key and ".." not in key.split("/"), path
        return os.path.join(self.root, *key.split("/"))

    def info(self, path, **kwargs):
        key, local = self._strip_protocol(path), self._local(path)
        if os.path.isfile(local):
            return {"name": key, "size": os.path.getsize(local), "type": "file"}
        if os.path.isdir(local) and ("/" not in key or os.listdir(local)):
            return {"name": key, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kwargs):
        info = self.info(path)
        if info["type"] == "file":
            out = [info]
        else:
            out = [self.info(f"{info['name']}/{n}") for n in sorted(os.listdir(self._local(path)))]
        return out if detail else [i["name"] for i in out]

    def _open(self, path, mode="rb", **kwargs):
        key, local = self._strip_protocol(path), self._local(path)
        if mode == "rb":
            type(self).log.append(("read", key))
            return open(local, "rb")
        if mode != "wb":
            raise NotImplementedError(f"objects cannot be opened in mode {mode!r}")
        log = type(self).log

        class Upload(io.BytesIO):
            def close(self):
                if not self.closed:
                    os.makedirs(os.path.dirname(local), exist_ok=True)
                    with open(local + ".uploading", "wb") as f:
                        f.write(self.getvalue())
                    os.replace(local + ".uploading", local)
                    log.append(("write", key))
                super().close()

        return Upload()

    def mkdir(self, path, create_parents=True, **kwargs):
        pass  # no directories in an object store

    def makedirs(self, path, exist_ok=False):
        pass

    def rm_file(self, path):
        local = self._local(path)
        if not os.path.exists(local):  # a prefix that vanished with its last object
            return
        if os.path.isdir(local):
            if not os.listdir(local):
                os.rmdir(local)
        else:
            os.remove(local)
        parent = os.path.dirname(local)  # prefixes vanish with their last object
        while os.path.dirname(parent) != self.root and os.path.isdir(parent) \
                and not os.listdir(parent):
            os.rmdir(parent)
            parent = os.path.dirname(parent)

    def _rm(self, path):
        self.rm_file(path)

    def rmdir(self, path):
        pass

    def cp_file(self, path1, path2, **kwargs):
        with self.open(path1, "rb") as src, self.open(path2, "wb") as dst:
            dst.write(src.read())


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The fake behind gs://; a fresh cache; a working directory that must stay empty."""
    root = tmp_path / "gcs"
    (root / "bucket").mkdir(parents=True)
    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.setattr(FakeGcs, "root", str(root))
    monkeypatch.setattr(FakeGcs, "log", [])
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(registry, protocol, FakeGcs)
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()
    # A URL handled as a local path would have left a `gs:` folder here.
    assert os.listdir(cwd) == []


def orbax_into_the_fake(monkeypatch, root):
    init = Checkpointer.__init__

    def redirected(self, directory, **kwargs):
        directory = str(directory)
        if directory.startswith("gs://"):
            directory = os.path.join(root, directory.removeprefix("gs://"))
        init(self, directory, **kwargs)

    monkeypatch.setattr(Checkpointer, "__init__", redirected)


def writes(prefix=""):
    return [k for op, k in FakeGcs.log if op == "write" and k.startswith(prefix)]


def test_epath_reaches_gs_through_the_fsspec_gcs_filesystem(gcs):
    assert not gpath._is_tf_installed()
    assert epath.Path(f"{W}/x")._backend is backend.fsspec_backend
    assert type(backend.fsspec_backend.fs(f"{W}/x")) is FakeGcs
    paths.write_text(f"{W}/a/b.txt", "hello")
    assert (gcs / "bucket" / "run" / "a" / "b.txt").read_text() == "hello"
    with pytest.raises(NotImplementedError):
        epath.Path(f"{W}/a/b.txt").open("a")


def test_path_primitives(gcs, tmp_path):
    assert paths.is_remote("gs://b/x") and not paths.is_remote("/b/x")
    assert paths.resolve("gs://b/x/") == "gs://b/x"
    assert paths.resolve("rel") == os.path.join(os.getcwd(), "rel")
    assert paths.join("gs://b/x/", "y", "z.json") == "gs://b/x/y/z.json"
    paths.makedirs(f"{W}/empty")
    assert not paths.isdir(f"{W}/empty")  # a prefix with no objects is nothing
    paths.write_text(f"{W}/d/one.json", "1")
    paths.write_bytes(f"{W}/d/sub/two.bin", b"\0\1")
    assert paths.isdir(f"{W}/d") and paths.isfile(f"{W}/d/one.json")
    assert not paths.isfile(f"{W}/d") and not paths.exists(f"{W}/d/none")
    assert paths.listdir(f"{W}/d") == ["one.json", "sub"] and paths.getsize(f"{W}/d/one.json") == 1
    assert writes() == ["bucket/run/d/one.json", "bucket/run/d/sub/two.bin"]  # no temp names

    local = tmp_path / "local"
    paths.copy_tree(f"{W}/d", str(local))
    assert (local / "sub" / "two.bin").read_bytes() == b"\0\1"
    FakeGcs.log.clear()
    paths.copy_tree(str(local), f"{W}/e", last=("one.json",))
    assert writes() == ["bucket/run/e/sub/two.bin", "bucket/run/e/one.json"]
    paths.move_tree(f"{W}/e", f"{W}/f")
    assert not paths.exists(f"{W}/e") and paths.read_bytes(f"{W}/f/sub/two.bin") == b"\0\1"
    paths.remove(f"{W}/f/one.json")
    paths.remove(f"{W}/f/one.json")  # already gone: no error
    paths.rmtree(f"{W}/f")
    paths.rmtree(f"{W}/never")
    assert paths.listdir(W) == ["d"]

    target = str(local / "x.json")
    paths.write_text(target, "old")
    paths.write_text(target, "new")
    assert open(target).read() == "new" and sorted(os.listdir(local)) == ["one.json", "sub",
                                                                         "x.json"]


def test_local_mirror_fetches_once_per_content(gcs):
    paths.write_text(f"{W}/ds/info.json", "v1")
    paths.write_bytes(f"{W}/ds/shard-0", b"abc")
    first = paths.local_mirror(f"{W}/ds", ["info.json"])
    assert open(os.path.join(first, "shard-0"), "rb").read() == b"abc"
    FakeGcs.log.clear()
    assert paths.local_mirror(f"{W}/ds", ["info.json"]) == first
    assert FakeGcs.log == [("read", "bucket/run/ds/info.json")]
    paths.write_text(f"{W}/ds/info.json", "v2")
    paths.write_bytes(f"{W}/ds/shard-0", b"xyz")
    second = paths.local_mirror(f"{W}/ds", ["info.json"])
    assert second != first and not os.path.exists(first)
    assert open(os.path.join(second, "shard-0"), "rb").read() == b"xyz"


def test_synced_dir_copies_new_and_changed_files(gcs):
    synced = paths.SyncedDir(f"{W}/logs")
    with open(os.path.join(synced.local, "events"), "wb") as f:
        f.write(b"a")
    synced.sync()
    synced.sync()
    assert writes() == ["bucket/run/logs/events"]
    with open(os.path.join(synced.local, "events"), "ab") as f:
        f.write(b"b")
    synced.close()
    assert paths.read_bytes(f"{W}/logs/events") == b"ab" and not os.path.exists(synced.local)
    assert len(writes()) == 2


def test_audio_round_trip(gcs, tmp_path):
    audio = 0.5 * np.sin(np.linspace(0, 200, 1600, dtype=np.float32))
    audio_io.write_audio(f"{W}/a.wav", audio, 8000)
    audio_io.write_audio(str(tmp_path / "a.wav"), audio, 8000)
    assert writes() == ["bucket/run/a.wav"]
    assert paths.read_bytes(f"{W}/a.wav") == (tmp_path / "a.wav").read_bytes()
    remote, sr = audio_io.read_audio(f"{W}/a.wav", sample_rate=16000)
    local, _ = audio_io.read_audio(str(tmp_path / "a.wav"), sample_rate=16000)
    assert sr == 16000 and np.array_equal(remote, local)
    assert audio_io.audio_info(f"{W}/a.wav") == (8000, 1, 1600)
    with pytest.raises(audio_io.AudioReadError, match="no such file"):
        audio_io.read_audio(f"{W}/missing.wav")


def toy_stage(name, calls, after=(), sections=()):
    def run(cfg, workdir):
        calls.append(name)
        paths.write_text(os.path.join(workdir, name, "out.json"), "{}")
        return {"ran": name}

    return chain.Stage(name, after, sections,
                       lambda cfg, w: paths.isfile(os.path.join(w, name, "out.json")), run,
                       (name,))


def test_chain_records_skips_and_reruns_stages_in_a_gs_workdir(gcs):
    calls, lines = [], []
    stages = [toy_stage("a", calls, sections=("a",)), toy_stage("b", calls, ("a",), ("b",))]
    cfg = ml_collections.ConfigDict({"a": {"x": 1}, "b": {"y": 2}})
    summaries = chain.run_chain(stages, cfg, W, print_fn=lines.append)
    assert calls == ["a", "b"] and summaries["b"]["ran"] == "b"
    record = json.loads(paths.read_text(f"{W}/stages/a.json"))
    assert record["config"] == {"a": {"x": 1}} and record["summary"]["ran"] == "a"
    assert json.loads(paths.read_text(f"{W}/config.json"))["b"] == {"y": 2}
    chain.run_chain(stages, cfg, W, print_fn=lines.append)
    assert calls == ["a", "b"] and "[a] complete, skipped" in lines
    cfg.a.x = 3
    with pytest.raises(chain.StaleStage, match="stale: a, b"):
        chain.run_chain(stages, cfg, W, print_fn=lines.append)
    paths.write_text(f"{W}/b/left_over.txt", "old")
    chain.run_chain(stages, cfg, W, rerun_stale=True, print_fn=lines.append)
    assert calls == ["a", "b", "a", "b"] and not paths.exists(f"{W}/b/left_over.txt")


def test_chain_reuses_matching_stages_of_another_workdir(gcs):
    calls, lines = [], []
    stages = [toy_stage("a", calls, sections=("a",)), toy_stage("b", calls, ("a",), ("b",)),
              toy_stage("c", calls, ("b",), ("c",))]
    cfg = ml_collections.ConfigDict({"a": {"x": 1}, "b": {"y": 2}, "c": {"z": 3}})
    chain.run_chain(stages, cfg, W, print_fn=lines.append)
    assert calls == ["a", "b", "c"]
    other = "gs://bucket/other"
    # Same config: everything is copied, nothing runs.
    summaries = chain.run_chain(stages, cfg, other, reuse_from=W, print_fn=lines.append)
    assert calls == ["a", "b", "c"] and summaries["c"]["ran"] == "c"
    assert paths.isfile(f"{other}/c/out.json") and f"[a] reused from {W}" in lines
    # b changes: a is copied; b runs; c has the same config but reads the new b, so it runs.
    cfg.b.y = 5
    third = "gs://bucket/third"
    chain.run_chain(stages, cfg, third, reuse_from=W, print_fn=lines.append)
    assert calls == ["a", "b", "c", "b", "c"]
    assert json.loads(paths.read_text(f"{third}/stages/a.json"))["reused_from"] == W
    assert "reused_from" not in json.loads(paths.read_text(f"{third}/stages/c.json"))
    # Resumed with the same source: the copied stage still counts as the source's.
    paths.remove(f"{third}/b/out.json")
    chain.run_chain(stages, cfg, third, reuse_from=W, print_fn=lines.append)
    assert calls == ["a", "b", "c", "b", "c", "b"]
    with pytest.raises(config_lib.ConfigError, match="is the workdir itself"):
        chain.run_chain(stages, cfg, W, reuse_from=W)
    with pytest.raises(config_lib.ConfigError, match="not a chain's workdir"):
        chain.run_chain(stages, cfg, third, reuse_from="gs://bucket/nothing")


def toy_task():
    tx = optax.sgd(0.1)

    def init(rng):
        params = {"w": jax.random.normal(rng, (4, 1))}
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def step(state, batch, rng):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2))(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"])
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}, {"loss": loss}

    return loop.Task(name="toy", init=init, step=step, model_config={"dim": 4})


def toy_iterator():
    rng = np.random.default_rng(0)
    records = [{"x": rng.standard_normal(4).astype(np.float32), "y": np.ones(1, np.float32)}
               for _ in range(32)]
    return iter(grain.MapDataset.source(records).repeat().batch(8).to_iter_dataset())


def test_training_loop_logs_metrics_and_tensorboard_to_a_gs_workdir(gcs, monkeypatch):
    orbax_into_the_fake(monkeypatch, str(gcs))
    monkeypatch.setattr(loop, "SYNC_SECONDS", 0.0)
    # Both runs start within the same second, which names TensorBoard's files alike.
    from tensorboardX import event_file_writer
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1795283568.0))
    kwargs = dict(workdir=f"{W}/toy", log_cfg={"every_steps": 2, "progress": False},
                  checkpoint_cfg={"every_steps": 4}, logdir=f"{W}/logs/toy")
    first = loop.train(toy_task(), toy_iterator(), num_steps=4, **kwargs)
    assert [r["step"] for r in loop.read_history(f"{W}/toy")] == [2, 4]
    assert loop.read_history(f"{W}/toy")[-1]["train/loss"] == first.history[-1]["train/loss"]
    events = paths.listdir(f"{W}/logs/toy")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    assert paths.isdir(f"{W}/toy/checkpoints")
    resumed = loop.train(toy_task(), toy_iterator(), num_steps=6, **kwargs)
    assert resumed.step == 6
    assert [r["step"] for r in loop.read_history(f"{W}/toy")] == [2, 4, 6]
    assert len(paths.listdir(f"{W}/logs/toy")) == 2


def test_report_of_a_gs_workdir(gcs):
    paths.write_text(f"{W}/stages/codec.json", json.dumps({"summary": {"steps": 4}}))
    paths.write_text(f"{W}/codec/metrics.jsonl", "".join(
        json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    audio_io.write_audio(f"{W}/samples/sample_000.wav", np.zeros(4000, np.float32) + 0.1, 8000)
    paths.write_text(f"{W}/samples/samples.json",
                     json.dumps([{"file": "sample_000.wav", "prompt": "a test tone"}]))
    path = report.write_report(W)
    assert path == f"{W}/report.html"
    page = paths.read_text(path)
    assert W in page and "a test tone" in page and "data:audio/wav;base64," in page
    assert page.count("data:image/png;base64,") == 2
    assert paths.listdir(f"{W}/logs/figures") == ["codec_loss.png", "sample_0.png"]


def data_cfg(**overrides):
    return ml_collections.ConfigDict(dict(dict(
        name="synthetic_music", sample_rate=16000, channels=1, clip_seconds=0.25, num_train=3,
        num_test=2, seed=0), **overrides))


def test_synthetic_music_built_into_and_read_from_a_gs_data_dir(gcs, tmp_path):
    url = "gs://bucket/data"
    summary = builders.build("synthetic_music", data_cfg(), url, workers=1, progress=False)
    assert summary["path"] == f"{url}/synthetic_music/1.0.0" and not summary["already_built"]
    names = [k.rsplit("/", 1)[1] for k in writes("bucket/data/")]
    assert names[-1] == "dataset_info.json" and len(names) == 5
    assert builders.dataset_info(url, "synthetic_music")["splits"] == {"train": 3, "test": 2}
    local = str(tmp_path / "local_data")
    builders.build("synthetic_music", data_cfg(), local, workers=1, progress=False)
    for split in ("train", "test"):
        remote_examples = builders.show(url, "synthetic_music", split, n=5)
        local_examples = builders.show(local, "synthetic_music", split, n=5)
        for r, x in zip(remote_examples, local_examples, strict=True):
            assert np.array_equal(r["audio"], x["audio"]) and r["caption"] == x["caption"]
    FakeGcs.log.clear()
    assert builders.build("synthetic_music", data_cfg(), url, progress=False)["already_built"]
    assert len(builders.open_split(url, "synthetic_music", "train")) == 3
    assert not writes() and all(k.endswith(".json") for _, k in FakeGcs.log)  # no new fetch
    with pytest.raises(DataError, match="built with num_train=3"):
        builders.build("synthetic_music", data_cfg(num_train=4), url, progress=False)
    with pytest.raises(DataError, match="reads a local folder"):
        builders.build("audio_folder", data_cfg(name="audio_folder", source="gs://bucket/wavs",
                                                test_fraction=0.5, max_seconds=0.0),
                       "gs://bucket/af", progress=False)


def test_cli_data_and_tokenizer_commands_with_gs_paths(gcs, capsys):
    size = ["--config.data.num_train=3", "--config.data.num_test=2",
            "--config.data.clip_seconds=0.25"]
    assert cli.main(["data", "build", "synthetic_music", "--workdir", W] + size) == 0
    assert f"at {W}/data/synthetic_music/1.0.0" in capsys.readouterr().out
    assert cli.main(["data", "show", "synthetic_music", "--workdir", W, "-n", "2"] + size) == 0
    assert paths.getsize(f"{W}/data/synthetic_music_train.png") > 1000
    assert cli.main(["tokenizer", "train", "--workdir", W] + size) == 0
    assert Tokenizer.load(f"{W}/tokenizer/spm.model").vocab_size > 4
    assert cli.main(["clap", "eval", "--workdir", W, "--json", f"{W}/none.json"]) == 2
    assert "no CLAP model in gs://bucket/run" in capsys.readouterr().err


def test_data_and_tokenizer_stages_of_the_chain_on_gs(gcs):
    cfg = config_lib.get_config("tiny", ["data.num_train=3", "data.num_test=2",
                                         "data.clip_seconds=0.25"])
    summaries = chain.run_chain(chain.default_stages(), cfg, W, only=["data", "tokenizer"],
                                print_fn=lambda *a: None)
    assert summaries["data"]["splits"] == {"train": 3, "test": 2}
    assert chain.data_dir(cfg, W) == f"{W}/data" and chain._data_done(cfg, W)
    tokenizer = Tokenizer.load(f"{W}/tokenizer/spm.model")
    assert tokenizer.vocab_size == summaries["tokenizer"]["vocab_size"]
    assert paths.listdir(f"{W}/stages") == ["data.json", "tokenizer.json"]


def write_tiny_codec(directory):
    """A codec checkpoint with random weights from the parameter shapes (nothing compiled)."""
    config = CodecConfig(sample_rate=16000, channels=1, encoder_dim=4, encoder_rates=(2, 4, 4, 5),
                         latent_dim=8, decoder_dim=16, decoder_rates=(5, 4, 4, 2), n_codebooks=2,
                         codebook_size=16, codebook_dim=4)
    codec = make_codec(config)
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(codec.init(
        {"params": r}, jnp.zeros((1, config.hop_length, 1)))), jax.random.key(0))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32), shapes)
    inference.write_checkpoint(str(directory), config, variables["params"],
                               variables.get(STATS))
    return str(directory)


def test_latents_of_two_hosts_joined_in_a_gs_workdir(gcs, tmp_path):
    data = "gs://bucket/data"
    builders.build("synthetic_music", data_cfg(), data, workers=1, progress=False)
    codec = write_tiny_codec(tmp_path / "codec")
    out = f"{W}/latents"
    kwargs = dict(batch_size=2, progress=False, process_count=2)
    assert not codec_latents.encode_latents(codec, data_cfg(), data, out, process_index=1,
                                      **kwargs)["complete"]
    summary = codec_latents.encode_latents(codec, data_cfg(), data, out, process_index=0, **kwargs)
    assert summary["complete"] and latents.is_complete(out)
    assert not paths.exists(f"{out}/{codec_latents.PARTS_DIR}")
    assert latents.read_metadata(out)["data_dir"] == data
    train = builders.open_split(out, "latents", "train")
    assert sorted(int(e["source_index"]) for e in train) == [0, 1, 2]
    assert train[0]["latents"].shape == (25, 8)
    assert latents.read_stats(out).num_frames == 75
    again = codec_latents.encode_latents(codec, data_cfg(), data, out, process_index=0, **kwargs)
    assert again["already_built"]
